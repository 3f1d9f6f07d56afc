"""The start-up guards of train/world.py: a launch whose processes would each train alone, a requested
engine that does not run, and two trainings writing one output folder are all refused in one line.

The launch tests run the real `accelerate launch` with two gloo processes (~15 s each; three launches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdtune.errors import UserError
from sdtune.train import world

REPO = Path(__file__).resolve().parents[1]


def test_launch_reads_torchrun_and_deepspeed_variables():
    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "GROUP_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    assert world.Launch.from_env(torchrun) == world.Launch(4, 3, 1, 2, 2, 1)
    deepspeed_launcher = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "2", "CROSS_SIZE": "2",
                          "CROSS_RANK": "1"}
    assert world.Launch.from_env(deepspeed_launcher) == world.Launch(4, 2, 0, 2, 2, 1)
    assert world.Launch.from_env({}) == world.Launch(1, 0, 0, 1, 1, 0)  # started without a launcher
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        world.Launch.from_env({"WORLD_SIZE": "two"})


def test_requested_engine_comes_from_the_flag_or_accelerate_launch():
    assert world.requested_engine(False, {}) is None
    assert world.requested_engine(True, {}) == "deepspeed"
    assert world.requested_engine(False, {"ACCELERATE_USE_DEEPSPEED": "true"}) == "deepspeed"
    assert world.requested_engine(False, {"ACCELERATE_USE_FSDP": "True"}) == "fsdp"
    assert world.requested_engine(False, {"ACCELERATE_USE_FSDP": "false"}) is None


def test_a_single_process_passes_and_describes_itself(tmp_path):
    from accelerate import Accelerator

    from sdtune.train.accel import fresh_accelerator_state

    fresh_accelerator_state()
    accelerator = Accelerator(cpu=True)
    world.check_world(accelerator, world.Launch())
    world.check_engine(accelerator, None)
    assert world.describe(accelerator, world.Launch()) == "process 1/1 (machine 1/1, local 1/1): NO, backend none, device cpu"
    # a launch of 2 seen by a process that accelerate set up alone: the silent failure
    with pytest.raises(UserError, match="started 2 processes .* accelerate set up 1 .*would train on its own"):
        world.check_world(accelerator, world.Launch(processes=2, rank=1, local_rank=1, local_processes=2))
    with pytest.raises(UserError, match="do not split into 2 machines"):
        world.check_world(accelerator, world.Launch(machines=2))


# ------------------------------------------------------------------ the output folder's lock

_HOLDER = textwrap.dedent("""
    import sys, time
    from sdtune.train.world import lock_output_dir
    lock = lock_output_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_training_cannot_lock_the_folder_until_the_first_ends(tmp_path):
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        with pytest.raises(UserError, match=rf"another training is writing to this folder \(process {holder.pid} on "):
            world.lock_output_dir(out)
    finally:
        holder.kill()  # a crash: the lock file stays behind, but the kernel dropped the lock
        holder.wait()
    assert (out / world.LOCK_NAME).exists()
    lock = world.lock_output_dir(out)  # the stale lock is taken over
    assert lock.held and str(os.getpid()) in (out / world.LOCK_NAME).read_text()
    (out / "model.safetensors").write_bytes(b"x")
    lock.release()
    assert not (out / world.LOCK_NAME).exists() and out.is_dir()  # the folder kept what was written


def test_a_released_lock_leaves_no_folder_it_made(tmp_path):
    lock = world.lock_output_dir(tmp_path / "a" / "out")
    with pytest.raises(UserError, match="another training"):
        world.lock_output_dir(tmp_path / "a" / "out")  # a second open file: flock conflicts in one process too
    lock.release()
    lock.release()  # twice is harmless (the trainer and atexit)
    assert not (tmp_path / "a" / "out").exists()


# ------------------------------------------------------------------ real launches

_PROBE = textwrap.dedent("""
    import json, os, sys
    from sdtune.errors import UserError
    from sdtune.train import world
    from sdtune.train.options import TrainOptions
    from sdtune.train.setup import make_accelerator
    mode, outs = sys.argv[1], sys.argv[2].split(os.pathsep)
    def say(line):  # one write per line: the two processes share the pipe
        os.write(1, (line + "\\n").encode())
    def options(out):
        return TrainOptions(pretrained_model_name_or_path="unused", output_dir=out, **json.loads(sys.argv[3]))
    try:
        if mode == "plain":  # the sd-scripts way: no cpu=True
            from accelerate import Accelerator
            accelerator = Accelerator()
        else:
            accelerator = make_accelerator(options(outs[0]), print)
    except UserError as exc:
        say(f"refused: {exc.message}")
        accelerator = None
    for out in outs if accelerator else ():  # each started in turn, as one training each (a refusal keeps no state)
        try:
            lock = world.start(accelerator, options(out))
            say(f"started: {world.describe(accelerator)}" + (" holding the lock" if lock and lock.held else ""))
        except UserError as exc:
            say(f"refused: {exc.message}")
    if mode == "engine":  # the request dropped on the way: accelerate runs plain data parallel
        from accelerate import Accelerator
        os.environ.pop("ACCELERATE_USE_FSDP")
        accelerator = Accelerator(cpu=True)
        try:
            world.check_engine(accelerator, "fsdp", supported=frozenset({"fsdp"}))
        except UserError as exc:
            say(f"refused: {exc.message}")
    if mode == "sdtune":  # the --ddp_* options reach DDP and the process group
        import torch, torch.distributed as dist
        ddp = accelerator.prepare(torch.nn.Linear(2, 2))
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        say(f"ddp: static_graph={ddp.static_graph} gradient_as_bucket_view={ddp.gradient_as_bucket_view} "
            f"timeout={backend.options._timeout}")
""")



def _launch(tmp_path: Path, port: int, mode: str, *launch_flags: str, options=None, outs=("out",)) -> str:
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_flags, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "--num_cpu_threads_per_process", "1", str(script), mode,
           os.pathsep.join(str(tmp_path / out) for out in outs), json.dumps(options or {})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    return proc.stdout + proc.stderr[-3000:]  # the tail of stderr explains a failed launch


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")
def test_processes_that_each_believe_they_are_alone_are_refused(tmp_path):
    out = _launch(tmp_path, 29561, "plain", "--multi_gpu")
    # every process, not only one
    assert out.count("refused: accelerate launch: the launch started 2 processes") == 2, out
    assert out.count("but accelerate set up 1 (rank 0, local rank 0, NO); every process would train on its own") == 2
    assert out.count("export ACCELERATE_USE_CPU=1") == 2
    assert not (tmp_path / "out").exists()  # refused before anything was locked or written


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")
def test_a_requested_engine_that_does_not_run_is_refused(tmp_path):
    # accelerate launch --use_fsdp on a CPU: accelerate runs plain data parallel without a word
    out = _launch(tmp_path, 29562, "engine", "--use_fsdp", "--fsdp_version", "2")
    assert out.count("refused: accelerate launch --use_fsdp: FSDP was requested, but accelerate runs FSDP on CUDA GPUs "
                     "only and this machine has none") == 2, out
    assert out.count("refused: accelerate launch: FSDP was requested but accelerate runs MULTI_CPU instead") == 2, out


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")
def test_a_locked_folder_stops_every_process_and_a_free_one_starts_locks_and_sets_the_ddp_options(tmp_path):
    """One launch (each costs three Python processes): its processes first start on a folder another
    training holds, then on a free one, as two trainings launched one after the other would."""
    holder = _hold(tmp_path / "out")  # another training holds the folder
    options = {"ddp_timeout": 7, "ddp_gradient_as_bucket_view": True, "ddp_static_graph": True}
    try:
        out = _launch(tmp_path, 29563, "sdtune", "--multi_gpu", options=options, outs=("out", "free"))
    finally:
        holder.kill()
        holder.wait()
    assert out.count(f"refused: {tmp_path / 'out'}: another training is writing to this folder (process "
                     f"{holder.pid} on ") == 1, out
    assert out.count("refused: the main process stopped at start (its message is above)") == 1, out
    started = sorted(line for line in out.splitlines() if line.startswith("started:"))
    assert started == ["started: process 1/2 (machine 1/1, local 1/2): MULTI_CPU, backend gloo, device cpu:0 holding the lock",
                       "started: process 2/2 (machine 1/1, local 2/2): MULTI_CPU, backend gloo, device cpu:0"], out
    assert not (tmp_path / "free").exists()  # released at exit, and the folder it made (empty) removed
    # sd-scripts' meanings: minutes for --ddp_timeout, DDP's own switches for the other two
    assert out.count("ddp: static_graph=True gradient_as_bucket_view=True timeout=0:07:00") == 2, out
