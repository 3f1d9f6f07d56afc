"""The world a training process runs in, checked at start, and the output folder's lock.

accelerate fails silently in some launches: on a CPU without `cpu=True` (or `ACCELERATE_USE_CPU`)
every process of `accelerate launch --multi_gpu --num_processes 2` believes it is alone and trains
on its own, all of them writing the same outputs; with `cpu=True` a requested DeepSpeed or FSDP is
dropped for plain data parallel. Every process compares what the launcher set in its environment
with what accelerate built (`check_world`), and whether the engine the user asked for runs
(`check_engine`), and refuses in one line. The main process then locks the output folder
(`lock_output_dir`), so that two trainings can never write one folder, however they were started.

`start(accelerator, opts)` does all of it; the trainer calls it right after making the accelerator.
`accelerator_handlers(opts)` gives the accelerator sd-scripts' --ddp_* settings. torch and accelerate
are imported inside the functions that use them.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import UserError

LOCK_NAME = ".sdtune-lock"
_TRUE = {"1", "true", "yes", "on"}

# Engines the trainer runs correctly under; a requested engine outside this set is refused, since a
# trainer not built for sharded weights would save or validate wrongly under it.
SUPPORTED_ENGINES: frozenset[str] = frozenset({"deepspeed", "fsdp"})

_ENGINE_TYPES = {"deepspeed": "DEEPSPEED", "fsdp": "FSDP"}
_ENGINE_NAMES = {"deepspeed": "DeepSpeed", "fsdp": "FSDP"}


@dataclass(frozen=True)
class Launch:
    """What the launcher (torchrun under `accelerate launch`, or DeepSpeed's) told this process."""

    processes: int = 1
    rank: int = 0
    local_rank: int = 0
    local_processes: int = 1
    machines: int = 1
    machine_rank: int = 0

    @classmethod
    def from_env(cls, env=None) -> "Launch":
        env = os.environ if env is None else env

        def number(*names: str, default: int) -> int:
            for name in names:
                value = env.get(name, "").strip()
                if value:
                    try:
                        return int(value)
                    except ValueError:
                        raise UserError(f"the launcher set {name}={value!r}, not a whole number",
                                        fix="Start training with accelerate launch or torchrun.") from None
            return default

        processes = number("WORLD_SIZE", default=1)
        local_processes = number("LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=processes)
        return cls(processes=processes, rank=number("RANK", default=0), local_rank=number("LOCAL_RANK", default=0),
                   local_processes=local_processes,
                   machines=number("GROUP_WORLD_SIZE", "CROSS_SIZE", default=max(1, processes // max(1, local_processes))),
                   machine_rank=number("GROUP_RANK", "CROSS_RANK", "NODE_RANK", default=0))


def check_world(accelerator, launch: Launch | None = None) -> None:
    """Refuse a process whose accelerate state disagrees with its launch (one line, on every process)."""
    launch = Launch.from_env() if launch is None else launch
    seen = (accelerator.num_processes, accelerator.process_index, accelerator.local_process_index)
    wanted = (launch.processes, launch.rank, launch.local_rank)
    if seen != wanted:
        alone = accelerator.num_processes == 1 and launch.processes > 1
        raise UserError(
            f"the launch started {launch.processes} processes (this is rank {launch.rank}, local rank "
            f"{launch.local_rank}) but accelerate set up {accelerator.num_processes} (rank {accelerator.process_index}, "
            f"local rank {accelerator.local_process_index}, {_type_name(accelerator)})"
            + ("; every process would train on its own and write the same outputs" if alone else ""),
            where="accelerate launch",
            fix=("On a machine without a GPU export ACCELERATE_USE_CPU=1 (accelerate launch --cpu starts one process only); with GPUs, check "
                 "that each process sees one (CUDA_VISIBLE_DEVICES)." if alone else
                 "Launch with accelerate launch or torchrun and let it set WORLD_SIZE, RANK and LOCAL_RANK."))
    if launch.processes % launch.machines or launch.local_processes * launch.machines != launch.processes:
        raise UserError(f"{launch.processes} processes do not split into {launch.machines} machines of "
                        f"{launch.local_processes} processes each", where="accelerate launch",
                        fix="Give --num_processes as the total over all machines, a multiple of --num_machines.")
    if launch.processes > 1:
        _check_machines_agree(launch)


def _check_machines_agree(launch: Launch) -> None:
    """Every process must report the same machine count and each machine its full set of processes;
    a machine started with another --num_machines or --num_processes would otherwise train a
    different schedule."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = (launch.machines, launch.local_processes, launch.machine_rank, launch.local_rank)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    shapes = {(m, lp) for m, lp, _, _ in everyone}
    slots = sorted((mr, lr) for _, _, mr, lr in everyone)
    expected = sorted((mr, lr) for mr in range(launch.machines) for lr in range(launch.local_processes))
    if len(shapes) > 1 or slots != expected:
        raise UserError(f"the machines of this run were launched differently (machines, processes per machine, "
                        f"machine rank, local rank of each process: {sorted(everyone)})", where="accelerate launch",
                        fix="Launch every machine with the same --num_machines and --num_processes and its own "
                            "--machine_rank (0 to machines - 1).")


def requested_engine(deepspeed: bool = False, env=None) -> str | None:
    """The sharded engine the user asked for: by sdtune's --deepspeed, or by `accelerate launch
    --use_deepspeed / --use_fsdp` or an accelerate config file (both reach us through the environment)."""
    env = os.environ if env is None else env
    if deepspeed or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        return "fsdp"
    return None


def check_engine(accelerator, requested: str | None, supported: frozenset[str] = SUPPORTED_ENGINES) -> None:
    """Refuse a requested engine that sdtune cannot train under, or that accelerate silently dropped."""
    if requested is None:
        return
    name = _ENGINE_NAMES[requested]
    if requested not in supported:
        _refuse_unsupported(requested)
    running = _type_name(accelerator)
    if running != _ENGINE_TYPES[requested]:
        hint = ("accelerate drops it when told to use the CPU (ACCELERATE_USE_CPU, --cpu)"
                if os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE else
                "accelerate runs FSDP on GPUs only" if requested == "fsdp" else
                "accelerate falls back without a word in some configurations")
        raise UserError(f"{name} was requested but accelerate runs {running} instead ({hint})", where="accelerate launch",
                        fix=f"Fix the launch so that {name} runs, or drop the request.")


def accelerator_handlers(opts, backend: str | None = None) -> list:
    """accelerate's kwargs handlers for the DDP and process-group options, as sd-scripts sets them,
    and a process-group `backend` when one must be named (DeepSpeed on CPUs: `zero.process_group_backend`);
    first, an engine requested through accelerate launch that sdtune cannot run under is refused,
    before accelerate tries it (on a CPU accelerate's FSDP setup dies with a traceback)."""
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    requested = requested_engine(getattr(opts, "deepspeed", False))
    if requested is not None and requested not in SUPPORTED_ENGINES:
        _refuse_unsupported(requested)
    if requested == "fsdp":  # accelerate builds FSDP from the launch's settings: refuse what cannot run first
        from sdtune.train.fsdp import check_launch

        check_launch(opts)
    if requested == "deepspeed" and not getattr(opts, "deepspeed", False):
        # accelerate would build its own plugin from the launch's settings, which the trainer does not read
        raise UserError("the launch asks for DeepSpeed (accelerate launch --use_deepspeed or a config file) but "
                        "sdtune was not given --deepspeed", where="accelerate launch",
                        fix="Add --deepspeed and set ZeRO up with --zero_stage and the --offload_* flags "
                            "(drop --use_deepspeed), or launch plain data parallel.")
    # A trained text encoder conditioned on an earlier layer (clip skip) leaves its top layers
    # without gradients, which DDP must be told about.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=opts.train_text_encoder,
                                              gradient_as_bucket_view=opts.ddp_gradient_as_bucket_view,
                                              static_graph=opts.ddp_static_graph)]
    group = {}
    if opts.ddp_timeout:
        group["timeout"] = timedelta(minutes=opts.ddp_timeout)
    if backend:
        group["backend"] = backend
    if group:
        # accelerate passes on only what differs from its defaults: otherwise the backend stays its choice
        handlers.append(InitProcessGroupKwargs(**group))
    return handlers


def _refuse_unsupported(requested: str) -> None:
    name = _ENGINE_NAMES[requested]
    raise UserError(f"{name} was requested, but sdtune does not train under {name} yet (its saving, "
                    "validation and sampling need the full weights on every process)", where="accelerate launch",
                    fix="Launch plain data parallel (accelerate launch --multi_gpu) without --use_deepspeed, "
                        "--use_fsdp or a config file that selects them.")


def describe(accelerator, launch: Launch | None = None) -> str:
    """One line per process, so that a wrong world is visible in any log."""
    launch = Launch.from_env() if launch is None else launch
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    return (f"process {accelerator.process_index + 1}/{accelerator.num_processes} (machine {launch.machine_rank + 1}/"
            f"{launch.machines}, local {accelerator.local_process_index + 1}/{launch.local_processes}): "
            f"{_type_name(accelerator)}, backend {backend}, device {accelerator.device}")


def _type_name(accelerator) -> str:
    kind = accelerator.distributed_type
    return getattr(kind, "value", str(kind))


# ------------------------------------------------------------------ the output folder's lock

class OutputLock:
    """An exclusive lock on an output folder, held by a training's main process while it runs.

    The lock is the operating system's (flock; on Windows a locked byte), on a file `.sdtune-lock` in
    the folder that names its holder. The kernel drops it when the holder ends in any way, a crash or
    a kill included, so a lock file left behind is stale by construction and the next run takes it
    over. On NFS, Linux maps flock to the server's byte-range locks, which a crashed client loses
    when its lease ends (about 90 s).
    """

    def __init__(self, folder: Path, handle, made_folder: bool):
        self.folder, self.path = folder, folder / LOCK_NAME
        self._handle, self._made_folder = handle, made_folder

    def release(self) -> None:
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        try:
            self.path.unlink()  # while still locked: no newcomer can take the file we are deleting
        except OSError:
            pass
        handle.close()
        if self._made_folder:
            try:
                self.folder.rmdir()  # only if the run wrote nothing there
            except OSError:
                pass

    @property
    def held(self) -> bool:
        return self._handle is not None


def lock_output_dir(folder: str | Path) -> OutputLock:
    """Lock `folder` (made if missing) for this training, or refuse in one line if another holds it."""
    folder = Path(folder)
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the output folder ({exc.strerror})", where=str(folder),
                        fix="Give --output_dir a folder you can write to.") from None
    path = folder / LOCK_NAME
    for _ in range(20):  # a holder that deletes the file as we open it: open again
        handle = open(path, "a+")
        if not _try_lock(handle):
            holder = _read_holder(path)
            handle.close()
            raise UserError(f"another training is writing to this folder ({holder})", where=str(folder),
                            fix="Wait for it to end or give a different --output_dir; if no training runs, "
                                f"the lock is left by a process on another machine: delete {LOCK_NAME}.")
        if _same_file(handle, path):
            break
        handle.close()
    else:
        raise UserError("cannot lock the output folder: its lock file keeps changing", where=str(folder),
                        fix="Give a different --output_dir.")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    lock = OutputLock(folder, handle, made)
    atexit.register(lock.release)
    return lock


def _try_lock(handle) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"process {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder did not say who it is"


# ------------------------------------------------------------------ the one call

def start(accelerator, opts, *, deepspeed: bool = False) -> OutputLock | None:
    """Check this process's world and engine; the main process then locks the output folder.

    Returns the lock (None on other processes); it is released at exit, or earlier by `release()`.
    """
    launch = Launch.from_env()
    check_world(accelerator, launch)
    check_engine(accelerator, requested_engine(deepspeed))
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = lock_output_dir(opts.output_dir)
        except UserError as exc:
            refusal = exc
    if accelerator.num_processes > 1:
        # the other processes would otherwise run on until they wait for the main one at a collective
        import torch.distributed as dist

        told = [None if refusal is None else refusal.message]
        dist.broadcast_object_list(told, src=0)
        if told[0] is not None and refusal is None:
            raise UserError("the main process stopped at start (its message is above)")
    if refusal is not None:
        raise refusal
    return lock
