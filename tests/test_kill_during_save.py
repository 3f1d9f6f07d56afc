"""kill -9 at random moments during saves always leaves the previous model and state loadable.

A child process, forked from this one (torch already imported, so no 10 s start per kill), saves a
model as .safetensors and .ckpt and a training state into the same names, over and over, with the
functions training saves with (`checkpoint.save_model`, `state.save_state`). Every save is one
known version: all U-Net weights, the optimizer's moments and the state's step hold the version
number. The parent kills the child after a random time spread over a few saves, then loads what is
under the final names, as a user's next run would (the state through `load_state`, what --resume
calls): each must be whole, of one version, and the one before the kill or a newer one. Temporary
files a kill leaves behind must not be what the loaders pick up.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from sdtune import checkpoint
from sdtune.checkpoint.io import read_state_dict
from sdtune.train import state as train_state

# one torch thread: an OpenMP pool does not survive a fork
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"), pytest.mark.usefixtures("one_thread")]

KILLS = 20
MOMENTS = 16  # parameters with optimizer moments
FORMATS = ("safetensors", "ckpt")
UNET_PREFIX = "model.diffusion_model."


class Saver:
    """The model and the training state as training holds them, and one save of both."""

    def __init__(self, model, out: Path):
        from accelerate import Accelerator

        from sdtune.train.accel import fresh_accelerator_state

        fresh_accelerator_state()
        self.accelerator = Accelerator(cpu=True)
        self.model, self.out = model, out
        unet = model.unet
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        self.unet, self.optimizer, self.scheduler = self.accelerator.prepare(unet, optimizer, scheduler)
        # An optimizer step, so that the state holds moments. Only a few parameters get a gradient
        # (and so moments): thousands of tensors would make each load take seconds, for no more cover.
        for p in list(self.unet.parameters())[:MOMENTS]:
            p.grad = torch.ones_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def set_version(self, version: int) -> None:
        with torch.no_grad():
            for p in self.unet.parameters():
                p.fill_(version)
                for moment in self.optimizer.state[p].values():
                    if moment.dim():  # exp_avg, exp_avg_sq (not the step counter)
                        moment.fill_(version)

    def save(self, version: int, formats=FORMATS) -> None:
        self.set_version(version)
        for fmt in formats:
            checkpoint.save_model(self.model, self.out / f"N.{fmt}", fmt=fmt, progress=False)
        train_state.save_state(self.accelerator, self.out / "N-state", train_state.Position(global_step=version),
                               {"seed": 1})

    def loaded_versions(self, formats=FORMATS) -> dict[str, int]:
        """The version under each final name, loaded in full; fails on a file that is partial or mixed."""
        found = {}
        for name in (f"N.{fmt}" for fmt in formats):
            tensors, _ = read_state_dict(self.out / name)
            unet = [t for k, t in tensors.items() if k.startswith(UNET_PREFIX)]
            assert len(unet) == self.unet_tensors, f"{name}: {len(unet)} U-Net tensors"
            found[name] = _one_value(unet, name)
            assert sum(t.numel() for t in tensors.values()) == self.total_numel, name
        self.set_version(-1)  # so that loading must overwrite every value
        position = train_state.load_state(self.accelerator, self.out / "N-state")
        params = list(self.unet.parameters())
        version = _one_value(params, "N-state/model.safetensors")
        moments = [m for p in params for m in self.optimizer.state[p].values() if m.dim()]
        assert len(moments) == 2 * MOMENTS
        assert _one_value(moments, "N-state/optimizer.bin") == version == position.global_step, \
            f"a state of mixed versions: model {version}, optimizer {_one_value(moments, 'x')}, step {position.global_step}"
        found["N-state"] = version
        return found


def _one_value(tensors, name: str) -> int:
    low = min(float(t.detach().min()) for t in tensors if t.numel())
    high = max(float(t.detach().max()) for t in tensors if t.numel())
    assert low == high and low == int(low), f"{name} mixes versions: values from {low} to {high}"
    return int(low)


def _leftovers(out: Path) -> set[tuple[str, int]]:
    """What a killed save left beside the final names (name, modification time)."""
    finals = {"N.safetensors", "N.ckpt", "N-state"}
    return {(p.name, p.stat().st_mtime_ns) for p in out.iterdir() if p.name not in finals}


def test_kill_9_during_saves_leaves_the_previous_model_and_state_loadable(tmp_path, tiny_sd1):
    import copy

    out = tmp_path / "out"
    out.mkdir()
    saver = Saver(copy.deepcopy(tiny_sd1), out)
    saver.save(0)  # the first save, whole: what must survive until a newer one is whole
    started = time.perf_counter()
    saver.save(0, FORMATS[:1])  # again, timed without the first call's warm-up: one save as a child makes it
    duration = time.perf_counter() - started
    tensors, _ = read_state_dict(out / "N.safetensors")
    saver.unet_tensors = sum(k.startswith(UNET_PREFIX) for k in tensors)
    saver.total_numel = sum(t.numel() for t in tensors.values())
    assert saver.loaded_versions() == {"N.safetensors": 0, "N.ckpt": 0, "N-state": 0}

    rng = random.Random(20261201)
    survived = {"N.safetensors": 0, "N.ckpt": 0, "N-state": 0}
    interrupted = 0  # kills that left a save's temporary file or folder: the kill hit a save
    for kill in range(1, KILLS + 1):
        first = kill * 1000  # the versions this child writes: first + 1, first + 2, ...
        # each child saves one model format (and the state): loading both after every kill would
        # double the test's time; the other file must then stay as it was, byte for byte
        fmt = FORMATS[kill % 2]
        untouched = out / f"N.{FORMATS[1 - kill % 2]}"
        untouched_bytes = untouched.read_bytes()
        left_before = _leftovers(out)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child saves until it is killed
            try:
                for version in range(first + 1, first + 200):
                    saver.save(version, (fmt,))
            finally:
                os._exit(3)
        time.sleep(rng.uniform(0.0, 2.0 * duration))  # into the first or second save
        os.kill(pid, signal.SIGKILL)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL, "the child ended before the kill"
        left = _leftovers(out)
        interrupted += left != left_before
        # the next save of a name removes what a killed one left: they do not pile up, one per kill
        for model in FORMATS:
            assert len([n for n, _ in left if n.startswith(f".N.{model}.tmp-")]) <= 1, sorted(n for n, _ in left)
        assert untouched.read_bytes() == untouched_bytes
        found = saver.loaded_versions((fmt,))
        for name, version in found.items():
            # the one before the kill, or one this child wrote (whole, as checked by the loading)
            assert version == survived[name] or first < version < first + 200, (kill, name, version, survived[name])
        survived.update(found)
    assert interrupted >= KILLS // 4, f"only {interrupted} of {KILLS} kills hit a save: the kills missed the saves"
    assert all(v >= 1000 for v in survived.values())  # the children saved, not only the first save survived


def test_a_folder_save_killed_between_its_renames_gets_its_previous_version_back(tmp_path, tiny_sd1):
    """A Diffusers folder cannot be renamed over another: the previous one steps aside first. A kill
    between the two renames leaves no folder under the name; the next save puts the previous one back
    before it starts, so that it is there even when that save fails too."""
    import errno

    from sdtune.checkpoint.load import load_model

    final = tmp_path / "N"
    checkpoint.save_model(tiny_sd1, final, fmt="diffusers", progress=False)
    before = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst) == final:  # the new folder is written and the old one set aside
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *args, **kwargs)

        os.replace = replace
        try:
            checkpoint.save_model(tiny_sd1, final, fmt="diffusers", progress=False)
        finally:
            os._exit(3)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    assert not final.exists() and len(list(tmp_path.glob(".N.old-*"))) == 1

    def full(*args):  # the next save fails too: the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_fsync, os.fsync = os.fsync, full
    try:
        with pytest.raises(Exception, match="the disk is full"):
            checkpoint.save_model(tiny_sd1, final, fmt="diffusers_safetensors", progress=False)
    finally:
        os.fsync = real_fsync
    assert {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["N"]  # nothing else left
    assert load_model(final).unet is not None
