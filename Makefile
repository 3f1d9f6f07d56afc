# Two commands a new user needs (see README): `make demo` and `make test`.
# Each creates .venv on first use. torch is installed first, on its own, and then pinned with a
# constraints file so that no later install can swap it (on the project's machines any torch
# request other than torch==2.13.0 downloads a multi-GB CUDA build). Set TORCH_SPEC to choose
# another build, e.g. `make demo TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"`.
# Everything else comes at the versions of constraints.txt (the lock), so a fresh clone tests what was
# tested. `make test-latest` runs the suite against the newest releases in a separate .venv-latest, so
# that drift is seen on purpose; `make lock` then records those versions in constraints.txt.
# While working: `make lint` (ruff, configured in pyproject.toml) and `make test-fast` (the suite without
# the tests marked slow); CI (.ci/run) runs `make lint` and then `make test`.
# The suite runs on two workers that take over each other's not yet started tests (`--dist worksteal`): the
# long modules go first (tests/conftest.py), so no worker waits alone on a long run at the end.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.sdtune-installed
PYTEST_ARGS ?=
LOCK       := constraints.txt
LATEST     ?= .venv-latest

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: demo test test-fast lint venv clean test-latest lock test-sdscripts

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@# (re)create the venv when it is missing or was left without pip by an interrupted creation
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	@# Keep a torch that is already there; otherwise install the requested one first.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	@$(BIN)/python -W ignore -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt -c $(LOCK) -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sdtune demo demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist worksteal -q $(PYTEST_ARGS)

# The inner loop: everything but the slow runs (and sd-scripts' own, as in `make test`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist worksteal -q -m 'not slow and not sdscripts' $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The same suite against the newest releases of everything but torch (no lock), in its own venv.
test-latest:
	@$(LATEST)/bin/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(LATEST)
	@$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install -q $(TORCH_SPEC)
	@$(LATEST)/bin/python -W ignore -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-constraint.txt -e ".[dev]"
	$(LATEST)/bin/python -m pip list --format=freeze 2>/dev/null | grep -i -E '^(accelerate|diffusers|transformers|tokenizers|safetensors|huggingface.hub|pydantic|bitsandbytes)=='
	$(LATEST)/bin/python -m pytest -n 2 --dist worksteal -q $(PYTEST_ARGS)

# The checks that run sd-scripts itself beside sdtune (its own venv and source tree: a checkout of
# sd-scripts and a venv with its requirements): make test-sdscripts SDSCRIPTS_PYTHON=/path/venv-kohya/bin/python SDSCRIPTS_DIR=/path/sd-scripts
test-sdscripts: $(STAMP)
	@test -n "$(SDSCRIPTS_PYTHON)" -a -n "$(SDSCRIPTS_DIR)" || { echo "set SDSCRIPTS_PYTHON and SDSCRIPTS_DIR"; exit 2; }
	SDTUNE_SDSCRIPTS_PYTHON=$(SDSCRIPTS_PYTHON) SDTUNE_SDSCRIPTS_DIR=$(SDSCRIPTS_DIR) $(BIN)/python -m pytest -q -m sdscripts $(PYTEST_ARGS)

# Record the versions of .venv-latest (after `make test-latest` passed) as the lock.
lock:
	$(LATEST)/bin/python scripts/write_lock.py $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) demo_out .pytest_cache
