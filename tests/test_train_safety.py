"""Long runs are safe: Ctrl-C saves a resumable state, a diverging loss stops at once with the earlier
saves intact, and a kill during a save never leaves a broken file where a good one was.

Signals and kills go to a real child process. It is forked from the test process (which already has
torch and the libraries imported) instead of started afresh, which would spend ~10 s importing.
"""

import errno
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main

# one torch thread: also what makes os.fork safe (an OpenMP pool does not survive a fork)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, training_workspace):
    root = tmp_path_factory.mktemp("safety")
    training_workspace(root, n=4)
    return root


def _args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(ws / "model"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
            "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "5", "--max_data_loader_n_workers", "0",
            *extra]


def _fork(fn) -> int:
    """Run fn() in a child process; its return value is the exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code if isinstance(code, int) else 98)
    return pid


def _wait(pid: int, timeout: float = 120) -> int:
    """The child's exit code, or -signal when a signal ended it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child did not finish in time")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_identical(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_sigint_saves_a_state_that_resumes_exactly(ws, tmp_path):
    steps = "12"
    out = tmp_path / "interrupted"
    pid = _fork(lambda: main(_args(ws, out, "--max_train_steps", steps, "--save_every_n_steps", "2")))
    deadline = time.time() + 60
    while not (out / "N-step00000002.safetensors").exists():  # at least two steps done
        assert time.time() < deadline and os.waitpid(pid, os.WNOHANG)[0] == 0, "the run did not reach step 2"
        time.sleep(0.01)
    os.kill(pid, signal.SIGINT)
    assert _wait(pid) == 130  # a clean exit after saving, with the shell's status for Ctrl-C
    state = out / "N-state"
    record = json.loads((state / "train_state.json").read_text())
    stopped_at = record["position"]["global_step"]
    assert 2 <= stopped_at < int(steps)
    assert not (out / "N.safetensors").exists()  # an interrupted run writes no final model
    assert not list(out.glob("*.partial")) and not list(out.glob(".*tmp*"))

    resumed = tmp_path / "resumed"
    assert main(_args(ws, resumed, "--max_train_steps", steps, "--save_every_n_steps", "2", "--resume", str(state))) == 0
    reference = tmp_path / "reference"
    assert main(_args(ws, reference, "--max_train_steps", steps, "--save_every_n_steps", "2")) == 0
    _assert_identical(reference / "N.safetensors", resumed / "N.safetensors")


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_save(ws, tmp_path, capsys):
    out = tmp_path / "out"
    # AdamW moves every weight by about the learning rate at the first step: 1e30 overflows the
    # next forward pass.
    code = main(_args(ws, out, "--learning_rate", "1e30", "--max_train_steps", "5", "--save_every_n_steps", "1",
                      "--save_state"))
    assert code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("error: the loss became") and "at step 2" in err[0] and "learning rate" in err[0]
    good = out / "N-step00000001.safetensors"
    tensors = load_file(str(good))  # complete and readable
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert (out / "N-step00000001-state" / "train_state.json").is_file()
    assert sorted(p.name for p in out.iterdir() if "step" in p.name) == ["N-step00000001-state",
                                                                         "N-step00000001.safetensors"]
    assert not (out / "N.safetensors").exists()


def _kill_at_rename(name: str, args: list[str]):
    """A child that trains and is SIGKILLed the moment a save renames something onto `name`."""
    def child():
        real = os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).name == name:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *a, **k)

        os.replace = replace
        return main(args)

    return child


def test_a_kill_during_the_model_save_keeps_the_previous_file(ws, tmp_path):
    out = tmp_path / "out"
    assert main(_args(ws, out, "--max_train_steps", "1")) == 0
    before = _sha(out / "N.safetensors")
    # the same output, other weights; killed with the new file written but not yet in place
    pid = _fork(_kill_at_rename("N.safetensors", _args(ws, out, "--max_train_steps", "2", "--seed", "6")))
    assert _wait(pid) == -signal.SIGKILL
    assert _sha(out / "N.safetensors") == before
    assert load_file(str(out / "N.safetensors"))


def test_a_kill_during_the_state_save_keeps_the_previous_state(ws, tmp_path):
    out = tmp_path / "out"
    assert main(_args(ws, out, "--max_train_steps", "2", "--save_state_on_train_end")) == 0
    before = json.loads((out / "N-state" / "train_state.json").read_text())
    assert before["position"]["global_step"] == 2
    # A state folder is swapped in two renames (old aside, new in place): kill between them.
    pid = _fork(_kill_at_rename("N-state", _args(ws, out, "--max_train_steps", "3", "--save_state_on_train_end",
                                                 "--seed", "6")))
    assert _wait(pid) == -signal.SIGKILL
    assert not (out / "N-state").exists()
    # --resume finds the previous state beside the name (bit-exact resume itself: test_train_resume.py)
    resumed = tmp_path / "resumed"
    assert main(_args(ws, resumed, "--max_train_steps", "3", "--resume", str(out / "N-state"),
                      "--save_state_on_train_end")) == 0
    assert json.loads((resumed / "N-state" / "train_state.json").read_text())["position"]["global_step"] == 3
    # the next save puts a state in place again and removes the stale one
    assert main(_args(ws, out, "--max_train_steps", "1", "--save_state_on_train_end")) == 0
    assert (out / "N-state" / "train_state.json").is_file() and not (out / "N-state.old").exists()


def test_a_full_disk_during_a_save_is_one_clear_line_and_keeps_the_previous_files(ws, tmp_path, capsys,
                                                                                    monkeypatch):
    out = tmp_path / "out"
    assert main(_args(ws, out, "--max_train_steps", "1", "--save_state_on_train_end")) == 0
    model_before, state_before = _sha(out / "N.safetensors"), _sha(out / "N-state" / "train_state.json")
    capsys.readouterr()

    # the model file: the disk fills while its bytes are flushed (where a full disk often shows)
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(_args(ws, out, "--max_train_steps", "2", "--seed", "6")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: {out}: cannot write N.safetensors: the disk is full" in err and "Free some space" in err
    assert _sha(out / "N.safetensors") == model_before and load_file(str(out / "N.safetensors"))
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # the partial file is gone
    monkeypatch.undo()

    # the training state: the disk fills while its record is written
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "train_state.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert main(_args(ws, out, "--max_train_steps", "2", "--seed", "6", "--save_state_on_train_end")) == 2
    assert "cannot write N-state: the disk is full" in capsys.readouterr().err
    assert _sha(out / "N-state" / "train_state.json") == state_before
    assert not (out / "N-state.partial").exists()
