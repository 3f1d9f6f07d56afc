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
# Under pytest-xdist every worker (and every process it launches) gets one compute thread: with
# more, the workers' thread pools fight over the cores and CPU training runs up to 10x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

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


def _run_in_session(cmd: list[str], *, timeout: float = 300, **kwargs):
    """subprocess.run in its own session: on timeout the whole process group is killed (accelerate's
    launcher and every rank it started), so a hung run never outlives the test. Fails on timeout."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil  # a dependency of accelerate

        # torch's launcher starts each rank in a session of its own: killing the group alone leaves
        # hung ranks holding the output pipes, and the test would wait for them forever
        try:
            ranks = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            ranks = []
        os.killpg(proc.pid, signal.SIGKILL)
        for child in ranks:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... did not finish in {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def run_in_session():
    return _run_in_session


@pytest.fixture(scope="module")
def one_thread():
    """One torch compute thread for a module's tests, also without pytest-xdist: several threads
    contending with other processes on the shared 2-core machine run ~10x slower, and forking a
    process with a live OpenMP pool can hang the child."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _sdscripts_environment(request):
    """Tests marked sdscripts are deselected by default; selected, they need sd-scripts' Python."""
    if request.node.get_closest_marker("sdscripts") and not os.environ.get("SDTUNE_SDSCRIPTS_PYTHON"):
        pytest.fail("set SDTUNE_SDSCRIPTS_PYTHON (sd-scripts' venv Python) and SDTUNE_SDSCRIPTS_DIR (its source "
                    "tree), e.g. through `make test-sdscripts SDSCRIPTS_PYTHON=... SDSCRIPTS_DIR=...`")
