# Two commands a new user needs (see README): `make demo` and `make test`.
# Each creates .venv on first use. torch is installed first, on its own, and then pinned with a
# constraints file so that no later install can swap it (on the project's machines any torch
# request other than torch==2.13.0 downloads a multi-GB CUDA build). Set TORCH_SPEC to choose
# another build, e.g. `make demo TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.sdtune-installed
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Keep a torch that is already there; otherwise install the requested one first.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	@$(BIN)/python -W ignore -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sdtune demo demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
