"""The accelerate config files shipped in examples/accelerate parse with accelerate and launch what
docs/distributed.md says: one GPU, eight GPUs, two machines of eight, and two CPU processes (the
last one launched for real: two gloo processes, ~15 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "accelerate"


def _launch_args(name: str, *extra: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(EXAMPLES / name), *extra, "fine_tune.py"])
    return _validate_launch_command(args)[0]


def test_every_example_is_listed_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == ["eight_gpus.yaml", "eight_gpus_deepspeed.yaml",
                                                               "eight_gpus_fsdp.yaml", "one_gpu.yaml", "two_cpu_processes.yaml",
                                                               "two_nodes.yaml"]


@pytest.mark.parametrize("name, multi_gpu, processes, machines", [
    ("one_gpu.yaml", False, 1, 1),
    ("eight_gpus.yaml", True, 8, 1),
    ("two_nodes.yaml", True, 16, 2),
    ("two_cpu_processes.yaml", True, 2, 1),
])
def test_examples_parse_into_the_launch_they_describe(name, multi_gpu, processes, machines):
    args = _launch_args(name)
    assert (args.multi_gpu, args.num_processes, args.num_machines, args.machine_rank) == (multi_gpu, processes,
                                                                                         machines, 0)
    assert not args.cpu and not args.use_cpu  # --cpu would start one process only
    assert not args.use_deepspeed and not args.use_fsdp  # plain data parallel


def test_the_deepspeed_example_agrees_with_sdtune_flags(monkeypatch):
    """What accelerate passes on for it is what `--deepspeed --zero_stage 2` sets up: sdtune accepts that
    and refuses another stage."""
    from accelerate.commands.launch import prepare_deepspeed_cmd_env

    from sdtune.errors import UserError
    from sdtune.train.zero import DeepSpeedOptions, _check_launch_agrees

    args = _launch_args("eight_gpus_deepspeed.yaml")
    assert args.use_deepspeed and not args.cpu and (args.num_processes, args.num_machines) == (8, 1)
    args.deepspeed_fields_from_accelerate_config = []  # set by accelerate launch itself when it reads the file
    _, env = prepare_deepspeed_cmd_env(args)
    for name in ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        monkeypatch.setenv(name, env[name])
    _check_launch_agrees(DeepSpeedOptions(deepspeed=True, zero_stage=2))
    with pytest.raises(UserError, match="ACCELERATE_DEEPSPEED_ZERO_STAGE=2 but sdtune's --zero_stage is 3"):
        _check_launch_agrees(DeepSpeedOptions(deepspeed=True, zero_stage=3))

@pytest.mark.parametrize("extra, reshard", [((), True), (("--fsdp_reshard_after_forward", "false"), False)])
def test_the_fsdp_example_selects_fsdp2_full_shard_or_shard_grad_op(monkeypatch, extra, reshard):
    """What accelerate launch passes on for it is FSDP2, which sdtune accepts; its plugin reads full
    shard (or shard-grad-op with the documented flag) and transformer-based wrapping."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from sdtune.train.fsdp import check_launch
    from sdtune.train.options import TrainOptions

    args = _launch_args("eight_gpus_fsdp.yaml", *extra)
    assert args.use_fsdp and not args.cpu and (args.num_processes, args.num_machines) == (8, 1)
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
    check_launch(TrainOptions(pretrained_model_name_or_path="unused", output_dir="out"), env, cuda=True)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.reshard_after_forward) == (2, reshard)
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


def test_the_second_machine_overrides_only_its_rank():
    first, second = _launch_args("two_nodes.yaml"), _launch_args("two_nodes.yaml", "--machine_rank", "1")
    assert (second.machine_rank, second.main_process_ip, second.main_process_port) == (1, "10.0.0.1", 29500)
    assert (first.machine_rank, first.main_process_ip) == (0, "10.0.0.1")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")
def test_the_cpu_example_starts_two_processes_in_one_world(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import os
        from sdtune.train import world
        from sdtune.train.options import TrainOptions
        from sdtune.train.setup import make_accelerator
        opts = TrainOptions(pretrained_model_name_or_path="unused", output_dir="out")
        accelerator = make_accelerator(opts, print)
        world.check_world(accelerator)
        os.write(1, (world.describe(accelerator) + "\\n").encode())
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(EXAMPLES / "two_cpu_processes.yaml"), "--main_process_port", "29591", str(script)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("process "))
    assert lines == ["process 1/2 (machine 1/1, local 1/2): MULTI_CPU, backend gloo, device cpu:0",
                     "process 2/2 (machine 1/1, local 2/2): MULTI_CPU, backend gloo, device cpu:0"], proc.stderr[-3000:]
