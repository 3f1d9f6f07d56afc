"""Test-wide settings: offline, quiet, deterministic, nothing written outside tmp."""

import os
import sys
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub: any accidental hub access fails fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="sdtune-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SDTUNE = str(Path(sys.executable).with_name("sdtune"))


@pytest.fixture(autouse=True, scope="session")
def _quiet_libraries():
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:
        pass
    yield


@pytest.fixture(scope="session")
def tiny_sd1():
    from sdtune.testing import build_tiny_model

    return build_tiny_model("sd1", seed=0)
