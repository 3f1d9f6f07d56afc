"""DeepSpeed groundwork (train/zero.py): sd-scripts' ZeRO flags as options, the accelerate plugin built
from them, and the start-up check that DeepSpeed really runs.

The plugin and launch tests need the optional `deepspeed` package (pip install 'sdtune[deepspeed]')
and are skipped without it; the launches (~20 s each) start two gloo processes on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdtune.errors import UserError
from sdtune.train.zero import DeepSpeedOptions, deepspeed_plugin, process_group_backend

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("given, message", [
    ({"zero_stage": 3}, "--zero_stage: is a DeepSpeed option. Add --deepspeed"),
    ({"deepspeed": True, "offload_param_device": "cpu"}, "--offload_param_device: works with ZeRO stage 3 only "
                                                          "(--zero_stage is 2)"),
    ({"deepspeed": True, "zero_stage": 2, "zero3_save_16bit_model": True}, "--zero3_save_16bit_model: works with ZeRO"),
    ({"deepspeed": True, "offload_optimizer_device": "nvme"}, "needs both --offload_optimizer_device nvme and "
                                                              "--offload_optimizer_nvme_path"),
    ({"deepspeed": True, "zero_stage": 3, "offload_param_nvme_path": "/nvme"}, "needs both --offload_param_device"),
    ({"deepspeed": True, "zero_stage": 0, "offload_optimizer_device": "cpu"}, "ZeRO stage 0 shards nothing"),
    ({"deepspeed": True, "fp16_master_weights_and_gradients": True}, "only with ZeRO-2 and the optimizer offloaded"),
])
def test_meaningless_combinations_are_refused(given, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DeepSpeedOptions(**given)


def test_defaults_are_sd_scripts():
    ds = DeepSpeedOptions(deepspeed=True)
    assert (ds.zero_stage, ds.offload_optimizer_device, ds.zero3_init_flag) == (2, None, False)
    assert deepspeed_plugin(DeepSpeedOptions(), train_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0,
                            mixed_precision="no", world_size=1) is None
    assert process_group_backend(1) is None


def test_the_plugin_carries_sd_scripts_settings(monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    ds = DeepSpeedOptions(deepspeed=True, zero_stage=3, offload_optimizer_device="cpu", offload_param_device="cpu")
    plugin = deepspeed_plugin(ds, train_batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.5,
                              mixed_precision="bf16", world_size=8)
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["zero_force_ds_cpu_optimizer"] is False  # the run's own optimizer steps the offloaded weights
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (3, 3 * 4 * 8)
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(UserError, match="drop DeepSpeed without a word"):
        deepspeed_plugin(ds, train_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0,
                         mixed_precision="no", world_size=2)


_PROBE = textwrap.dedent("""
    import os, sys
    from accelerate import Accelerator
    from sdtune.errors import UserError
    from sdtune.train import world
    from sdtune.train.zero import DeepSpeedOptions, deepspeed_plugin, process_group_backend
    mode = sys.argv[1]
    launch = world.Launch.from_env()
    plugin = deepspeed_plugin(DeepSpeedOptions(deepspeed=True, zero_stage=2), train_batch_size=1,
                              gradient_accumulation_steps=1, max_grad_norm=1.0, mixed_precision="no",
                              world_size=launch.processes)
    if mode == "recipe":  # the one that works on CPUs: gloo named, no cpu=True
        from accelerate.utils import InitProcessGroupKwargs
        handlers = [InitProcessGroupKwargs(backend=process_group_backend(launch.processes))]
        accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers)
    else:  # cpu=True: accelerate drops DeepSpeed for plain data parallel
        accelerator = Accelerator(deepspeed_plugin=plugin, cpu=True)
    try:
        world.check_world(accelerator, launch)
        world.check_engine(accelerator, world.requested_engine(True), supported=frozenset({"deepspeed"}))
        line = "started: " + world.describe(accelerator, launch)
    except UserError as exc:
        line = "refused: " + exc.message
    os.write(1, (line + "\\n").encode())
""")


def _launch(tmp_path: Path, port: int, mode: str) -> str:
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "--num_cpu_threads_per_process", "1", str(script), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    return proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")
def test_deepspeed_dropped_by_accelerate_is_refused_and_the_cpu_recipe_runs(tmp_path):
    pytest.importorskip("deepspeed")
    out = _launch(tmp_path, 29581, "cpu")
    assert out.count("refused: accelerate launch: DeepSpeed was requested but accelerate runs MULTI_CPU instead") == 2, out
    out = _launch(tmp_path, 29582, "recipe")
    started = sorted(line for line in out.splitlines() if line.startswith("started:"))
    assert [line.split(":", 2)[1:] for line in started] == [
        [" process 1/2 (machine 1/1, local 1/2)", " DEEPSPEED, backend gloo, device cpu"],
        [" process 2/2 (machine 1/1, local 2/2)", " DEEPSPEED, backend gloo, device cpu"]], out


def test_the_options_are_sd_scripts_deepspeed_flags_and_train_options():
    from sdtune.train import sdscripts_flags
    from sdtune.train.options import TrainOptions

    listed = Path(sdscripts_flags.__file__).with_name("sdscripts_fine_tune_flags.txt").read_text().splitlines()
    flags = {line.split()[0] for line in listed if line.startswith("--")}
    assert {f"--{name}" for name in DeepSpeedOptions.model_fields} <= flags
    assert set(DeepSpeedOptions.model_fields) <= set(TrainOptions.model_fields)
    assert not set(DeepSpeedOptions.model_fields) & set(sdscripts_flags.PLANNED)


@pytest.mark.parametrize("given, message", [
    ({"zero3_init_flag": True, "zero_stage": 3}, "--zero3_init_flag: sdtune loads the model whole"),
    ({"fused_backward_pass": True}, "--fused_backward_pass: does not work under DeepSpeed"),
    ({"full_bf16": True, "mixed_precision": "bf16"}, "--full_bf16: does not work under DeepSpeed"),
    ({"ema": True, "zero_stage": 3}, "--ema: does not work under DeepSpeed: under ZeRO-3"),
    ({"hypernetwork_module": "hypernetwork_nai"}, "--hypernetwork_module: does not work under DeepSpeed"),
    ({"optimizer_type": "AdamW8bit", "offload_optimizer_device": "cpu"}, "--offload_optimizer_device: does not work"),
])
def test_options_that_cannot_act_under_deepspeed_are_refused(given, message):
    from sdtune.train.options import TrainOptions

    with pytest.raises(UserError, match=message):
        TrainOptions(pretrained_model_name_or_path="m", output_dir="o", deepspeed=True, **given)
    given.pop("zero3_init_flag", None)
    if "zero_stage" not in given and "offload_optimizer_device" not in given:
        TrainOptions(pretrained_model_name_or_path="m", output_dir="o", **given)  # accepted without DeepSpeed


def test_a_deepspeed_state_is_checked_for_its_own_files(tmp_path):
    """A DeepSpeed state holds the engine's folder instead of model.safetensors and optimizer.bin; one
    whose engine folder lost its model states is refused before anything loads."""
    import torch

    from sdtune.train.state import check_state_files

    torch.save({"step": 2}, tmp_path / "scheduler.bin")
    with pytest.raises(UserError, match="model.safetensors is missing"):
        check_state_files(tmp_path)  # no engine folder: an ordinary state, incomplete
    (tmp_path / "pytorch_model").mkdir()
    with pytest.raises(UserError, match="pytorch_model/ holds no model states"):
        check_state_files(tmp_path)
    torch.save({"module": {}}, tmp_path / "pytorch_model" / "mp_rank_00_model_states.pt")
    check_state_files(tmp_path)
    (tmp_path / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(UserError, match="damaged training state: zero_pp_rank_1"):
        check_state_files(tmp_path)


def test_nvme_offload_and_fp16_master_weights_reach_deepspeeds_config(monkeypatch):
    """What cannot run here (NVMe offload needs DeepSpeed's aio op, fp16 a GPU) still reaches the
    config DeepSpeed is given, with sd-scripts' meanings."""
    pytest.importorskip("deepspeed")
    from sdtune.train import zero

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(zero, "_cuda", lambda: True)  # as on a GPU machine: fp16 is DeepSpeed's to run
    ds = DeepSpeedOptions(deepspeed=True, zero_stage=3, offload_optimizer_device="nvme",
                          offload_optimizer_nvme_path="/nvme/opt", offload_param_device="nvme",
                          offload_param_nvme_path="/nvme/par")
    config = deepspeed_plugin(ds, train_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0,
                              mixed_precision="fp16", world_size=1).deepspeed_config
    zero_opt = config["zero_optimization"]
    assert (zero_opt["offload_optimizer"]["device"], zero_opt["offload_optimizer"]["nvme_path"]) == ("nvme", "/nvme/opt")
    assert (zero_opt["offload_param"]["device"], zero_opt["offload_param"]["nvme_path"]) == ("nvme", "/nvme/par")
    assert config["fp16"]["enabled"] is True and config["fp16"]["initial_scale_power"] == 0
    assert "fp16_master_weights_and_grads" not in config["fp16"]

    ds = DeepSpeedOptions(deepspeed=True, zero_stage=2, offload_optimizer_device="cpu",
                          fp16_master_weights_and_gradients=True)
    config = deepspeed_plugin(ds, train_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0,
                              mixed_precision="fp16", world_size=1).deepspeed_config
    assert config["fp16"]["fp16_master_weights_and_grads"] is True
