"""Test-wide settings: offline, quiet, deterministic, nothing written outside tmp."""

import os
import signal
import sys
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub: any accidental hub access fails fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
if "HF_HOME" not in os.environ:  # one empty hub cache per test run, removed when the process that made it ends
    import atexit
    import shutil

    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sdtune-hf-home-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
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


@pytest.fixture(autouse=True, scope="session")
def _one_tokenizer_per_contents():
    """Each local tokenizer folder's CLIP tokenizer is loaded once per test process and file contents.

    transformers takes ~0.4 CPU-s to load one (it parses the 4.6 MB of vocabulary JSON in Python before
    the Rust tokenizer parses it again), and the suite's model loads, nearly all of the package's own
    tokenizer carried by the tiny models, add up to about a minute. Keyed by the folder's bytes, not
    its path: a changed or broken folder is loaded (and fails) as without this. sdtune only reads
    from a tokenizer, so runs sharing one see what their own would hold; a test that changes one
    loads its own, with any keyword argument (`local_files_only=True`): only a bare folder is shared."""
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        yield
        return
    import hashlib

    original = CLIPTokenizer.from_pretrained  # bound to the class: .__func__ is the function itself
    own = CLIPTokenizer.__dict__.get("from_pretrained")
    loaded: dict[tuple, object] = {}

    def from_pretrained(cls, *args, **kwargs):
        folder = Path(args[0]) if len(args) == 1 and isinstance(args[0], (str, os.PathLike)) else None
        if kwargs or folder is None or not folder.is_dir():
            return original.__func__(cls, *args, **kwargs)
        digest = hashlib.sha256()
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            for part in (file.name.encode(), b"\0", file.read_bytes(), b"\0"):
                digest.update(part)
        key = (cls, digest.hexdigest())
        if key not in loaded:
            loaded[key] = original.__func__(cls, *args)
        return loaded[key]

    CLIPTokenizer.from_pretrained = classmethod(from_pretrained)
    yield
    if own is None:
        del CLIPTokenizer.from_pretrained
    else:
        CLIPTokenizer.from_pretrained = own


# The suite writes ~9 GB of models, states and caches (pytest's temporary folders); kept to the end of the
# run, and three runs kept by pytest, they filled the CI machine's disk. A passing test's `tmp_path` is
# removed when it ends (`tmp_path_retention_policy = "failed"` in pyproject.toml), and the folders a
# module's fixtures made with `tmp_path_factory.mktemp` are removed when the module is done, unless a
# test failed. Session fixtures' folders (names starting with SESSION_DIR) live to the end of the run.
SESSION_DIR = "session-"


@pytest.fixture(autouse=True, scope="module")
def _module_folders_removed_when_done(request, tmp_path_factory):
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = {p.name for p in base.iterdir()}
    failed = request.session.testsfailed
    yield  # an autouse fixture is set up before, and torn down after, the module's other fixtures
    if request.session.testsfailed != failed:
        return  # left for a look at what went wrong
    for folder in base.iterdir():
        if folder.name not in before and not folder.name.startswith(SESSION_DIR) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sd1():
    from sdtune.testing import build_tiny_model

    return build_tiny_model("sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    """`sdtune.testing.write_tiny_model` for tests that only need the files: each (family, seed,
    format, file name) is built and written once per test process, then copied. The writer is
    deterministic (same weights, same file name in the metadata; only the date differs), and
    building and converting costs ~1 s, which about thirty modules paid each."""
    import shutil

    from sdtune.testing import write_tiny_model

    store = tmp_path_factory.mktemp(SESSION_DIR + "tiny-models")
    written: dict[tuple, Path] = {}

    def copy(path: str | Path, family: str = "sd1", seed: int = 0, fmt: str | None = None) -> Path:
        path = Path(path)
        key = (family, seed, fmt, path.name)
        if key not in written:
            written[key] = write_tiny_model(store / str(len(written)) / path.name, family, seed=seed, fmt=fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        if written[key].is_dir():
            shutil.copytree(written[key], path)
        else:
            shutil.copyfile(written[key], path)
        return path

    return copy


@pytest.fixture(scope="session")
def training_workspace(tiny_model_file):
    """The folder a training test runs in, as `sdtune.testing.write_training_workspace` writes it
    (a tiny SD1 Diffusers model in `model/`, `n` images in `data/`, `meta.json`), with the model
    copied (see tiny_model_file) and its weights as safetensors, which load ~0.4 CPU-s faster than
    the pickled .bin files (those folders: test_diffusers_layout, test_checkpoint_roundtrip).
    Optional extra files: `model.safetensors` (the same weights as one file) with `safetensors=True`."""
    from sdtune.testing import make_dataset

    def write(root: str | Path, n: int = 4, seed: int = 0, *, safetensors: bool = False) -> Path:
        root = Path(root)
        tiny_model_file(root / "model", "sd1", seed=seed, fmt="diffusers_safetensors")
        if safetensors:
            tiny_model_file(root / "model.safetensors", "sd1", seed=seed)
        make_dataset(root / "data", n=n, seed=seed, metadata=root / "meta.json")
        return root

    return write


def _run_in_session(cmd: list[str], *, timeout: float = 300, **kwargs):
    """subprocess.run in its own session: on timeout the whole process group is killed (accelerate's
    launcher and every rank it started), so a hung run never outlives the test. Fails on timeout."""
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
        _show_stacks([psutil.Process(proc.pid), *ranks])
        os.killpg(proc.pid, signal.SIGKILL)
        for child in ranks:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... did not finish in {timeout} s:\n{out[-2000:]}\n{err[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# A test sets this (through the stacks_on_sigusr1 fixture) in a launch's environment when every Python process of the
# launch, its launchers too, prints its stacks on SIGUSR1
STACKS_ENV = "SDTUNE_TEST_STACKS_ON_USR1"


def _shows_stacks(process) -> bool:
    """Whether SIGUSR1 makes `process` print its stacks rather than end it: sdtune's own processes (the
    command and the ranks a launcher starts, which accelerate gives LOCAL_RANK), or any process of a
    launch prepared with `stacks_on_sigusr1`."""
    import psutil

    try:
        environ, line = process.environ(), " ".join(process.cmdline())
    except psutil.Error:
        return False
    if STACKS_ENV in environ:
        return True
    sdtune = "sdtune" in line or "fine_tune.py" in line
    return sdtune and ("LOCAL_RANK" in environ or "launch" not in line)  # a launcher would just end


def _show_stacks(processes) -> None:
    """Ask the processes that can for every thread's stack (a SIGUSR1 handler writes them to stderr), so
    that a test that timed out shows where each process was."""
    import time

    import psutil

    for process in processes:
        try:
            if _shows_stacks(process):
                process.send_signal(signal.SIGUSR1)
        except psutil.Error:
            pass
    time.sleep(2)


def _stacks_on_sigusr1(env: dict, folder: Path) -> dict:
    """`env` for a launch whose every Python process (the launchers too, not only sdtune's) prints its
    stacks when a timed-out `run_in_session` sends SIGUSR1: a sitecustomize in `folder` registers it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import faulthandler, signal, sys\n"
        "faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)\n")
    path = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, STACKS_ENV: "1"}


@pytest.fixture
def stacks_on_sigusr1():
    return _stacks_on_sigusr1


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


# The modules that take longest (worker-seconds on a quiet machine, longest first): under pytest-xdist
# they are run first, so that the short tests fill in at the end and no worker waits alone on a long
# run (with `--dist worksteal` an idle worker takes over the other's not yet started tests).
_LONGEST_FIRST = ("test_deepspeed.py", "test_compiled.py", "test_golden_run.py", "test_multinode.py", "test_fused_backward.py",
                  "test_world.py", "test_kill_during_save.py", "test_demo.py", "test_hypernetwork_training.py",
                  "test_train_multiprocess.py", "test_file_modes.py", "test_legacy_workflow.py", "test_memory_count.py",
                  "test_zero.py", "test_lr_schedules.py")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist only (each worker collects and sorts alike): the longest modules first, then
    the other modules with slow tests, then the rest, each module's tests kept together in their order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow_modules = {item.path.name for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.path.name
        if name in _LONGEST_FIRST:
            return _LONGEST_FIRST.index(name)
        return len(_LONGEST_FIRST) + (0 if name in slow_modules else 1)

    items.sort(key=rank)  # stable: the collection order within each rank
