"""FSDP2: the launch checks, and sdtune's weight seam on really sharded weights.

accelerate runs FSDP on GPUs only, so the sharded run here is one spawned pair of CPU processes over
gloo whose accelerate state is switched to FSDP2 after start (accelerate's own FSDP2 preparation,
`fully_shard` and its sharded checkpointing then run as they would on GPUs). It trains the tiny
U-Net with full shard and with shard-grad-op and checks it against the same U-Net trained unsharded
in one process: the weights after each step, the checkpoint sdtune's saver writes, a forward pass on
the main process alone, and resuming from a sharded state folder.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback

import pytest

from sdtune.errors import UserError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo processes are tested on Linux")

BATCH_SEED = 7
LR = 0.05


def _options(**kw):
    from sdtune.train.options import TrainOptions

    return TrainOptions(pretrained_model_name_or_path="unused", output_dir="out", **kw)


# ------------------------------------------------------------------ the launch


def test_fsdp_without_a_gpu_is_refused_before_accelerate_starts():
    from sdtune.train.fsdp import check_launch

    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    with pytest.raises(UserError, match="accelerate runs FSDP on CUDA GPUs only and this machine has none"):
        check_launch(_options(), env, cuda=False)


def test_fsdp1_is_refused_with_the_flag_that_selects_fsdp2():
    from sdtune.train.fsdp import check_launch

    for env in ({"ACCELERATE_USE_FSDP": "true"}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}):
        with pytest.raises(UserError) as caught:
            check_launch(_options(), env, cuda=True)
        assert "selects FSDP version 1" in caught.value.message
        assert "--fsdp_version 2" in str(caught.value)
    check_launch(_options(), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, cuda=True)


@pytest.mark.parametrize("flags, where", [
    ({"ema": True}, "--ema"),
    ({"fused_backward_pass": True}, "--fused_backward_pass"),
    ({"full_bf16": True, "mixed_precision": "bf16"}, "--full_bf16"),
    ({"optimizer_type": "AdamW8bit"}, "--optimizer_type"),
    ({"optimizer_type": "AdamWScheduleFree"}, "--optimizer_type"),
    ({"torch_compile": True}, "--torch_compile"),
])
def test_options_that_cannot_act_on_sharded_weights_are_refused(flags, where):
    from sdtune.train.fsdp import check_launch

    with pytest.raises(UserError) as caught:
        check_launch(_options(**flags), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, cuda=True)
    assert caught.value.where == where and "does not work under FSDP" in caught.value.message


def test_a_sharded_state_folder_is_accepted_whole_and_refused_without_a_shard_index(tmp_path):
    """What accelerate writes under FSDP2 (checked against a real save in the test below): the model and
    optimizer as torch.distributed.checkpoint folders, each with its .metadata index."""
    from sdtune.train.state import check_state_files

    (tmp_path / "scheduler.bin").write_bytes(b"")  # an empty file: not a zip, but its damage is not at issue
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(UserError, match="incomplete training state: pytorch_model_fsdp_0/.metadata is missing"):
        check_state_files(tmp_path)
    (tmp_path / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x")
    with pytest.raises(UserError, match="optimizer_0/.metadata is missing"):
        check_state_files(tmp_path)
    (tmp_path / "optimizer_0" / ".metadata").write_bytes(b"x")
    (tmp_path / "scheduler.bin").unlink()
    with pytest.raises(UserError, match="scheduler.bin is missing"):
        check_state_files(tmp_path)


# ------------------------------------------------------------------ a sharded world of two processes


def _optimizer(params):
    """SGD with momentum: its step is proportional to the gradient, so a gradient averaged wrongly over
    the processes shows (Adam's would hide a scale), and its momentum is state that a resume must restore."""
    import torch

    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _batch(unet, step: int):
    """The global batch of `step` (two samples): latents, timesteps, token ids, noise target."""
    import torch

    gen = torch.Generator().manual_seed(BATCH_SEED + step)
    cfg = unet.config
    size = cfg.sample_size
    x = torch.randn(2, cfg.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    ids = torch.randint(0, 1000, (2, 6), generator=gen)
    target = torch.randn(2, cfg.out_channels, size, size, generator=gen)
    return x, t, ids, target


def _predict(unet, encoder, x, t, ids):
    return unet(x, t, encoder_hidden_states=encoder(ids).last_hidden_state).sample


class Reference:
    """The model trained on the whole batch in one process, with plain torch: the independent side."""

    def __init__(self, model, train_te: bool):
        self.unet, self.encoder = copy.deepcopy(model.unet).train(), copy.deepcopy(model.text_encoder).train(train_te)
        self.params = [*self.unet.parameters(), *(self.encoder.parameters() if train_te else ())]
        self.encoder.requires_grad_(train_te)
        self.optimizer = _optimizer(self.params)

    def step(self, *steps: int) -> float:
        """One optimizer step on the batches of `steps` together."""
        import torch

        x, t, ids, target = (torch.cat(parts) for parts in zip(*(_batch(self.unet, n) for n in steps)))
        torch.nn.functional.mse_loss(_predict(self.unet, self.encoder, x, t, ids), target).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def weights(self) -> dict:
        return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}


def _sharded_run(accelerator, reshard: bool, tmp, rank: int, train_te: bool) -> None:
    """Full shard (`reshard`) checks everything and resumes; shard-grad-op trains the text encoder
    too (two modules in one sharded module), accumulates gradients over two micro-batches, and checks
    the steps and the whole weights."""
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    from sdtune.testing import build_tiny_model
    from sdtune.train import state
    from sdtune.train.setup import save_trained
    from sdtune.train.target import FullFineTune
    from sdtune.train.weights import Weights

    # the switch accelerate makes only on GPUs: its FSDP2 plugin, from the settings a launch passes
    # (transformer-based wrapping: the U-Net's blocks become FSDP units of their own, so that
    # full shard and shard-grad-op differ)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=reshard, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP  # one copies the other
    accelerator._models.clear()
    model = build_tiny_model("sd1", seed=0)
    reference = Reference(model, train_te) if rank == 0 else None
    weights = Weights(accelerator)
    target = FullFineTune(_options(train_text_encoder=train_te))
    target.place(model, device=accelerator.device, compute_dtype=torch.float32, note=lambda *a: None)
    optimizer = _optimizer([p for m in target.modules() for p in m.parameters()])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    *modules, optimizer, schedule = weights.prepare(*target.modules(), optimizer, schedule)
    target.adopt(modules)
    units = {type(m).__name__ for m in weights.engine.modules() if type(m).__name__.startswith("FSDP")}
    assert {"FSDPBasicTransformerBlock", "FSDPResnetBlock2D"} <= units, units
    assert ("FSDPCLIPEncoderLayer" in units) == train_te, units
    params = [p for m in modules for p in m.parameters()]
    assert all(isinstance(p, DTensor) for p in params)
    assert sum(p.to_local().numel() for p in params) < 0.6 * sum(p.numel() for p in params)  # about half each
    encoder = target.text_encoder

    def step(n: int, compare: bool = True) -> None:
        x, t, ids, noise = _batch(model.unet, n)
        share = slice(rank, rank + 1)  # each process its half of the global batch
        with torch.enable_grad():
            loss = torch.nn.functional.mse_loss(_predict(target.unet, encoder, x[share], t[share], ids[share]),
                                                noise[share])
            accelerator.backward(loss)
        norm = float(accelerator.clip_grad_norm_(params, 1.0))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if reference is not None and compare:
            assert abs(norm - reference.step(n)) < 1e-5 * norm

    def full_weights() -> dict:
        with weights.full(target.unet) as whole:
            return {k: v.detach().clone() for k, v in whole.state_dict().items()}

    def assert_matches(mine: dict, theirs: dict, atol=2e-6) -> None:
        assert mine.keys() == theirs.keys()
        for key in theirs:
            assert type(mine[key]) is torch.Tensor, key  # plain, whole tensors: an ordinary checkpoint
            torch.testing.assert_close(mine[key], theirs[key], atol=atol, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")

    def accumulated_step(n: int) -> None:
        """Two micro-batches per process, through the trainer's accumulation (FSDP told not to reduce
        the first's gradients): one step on four samples."""
        from sdtune.train.accel import micro_batch

        for micro, closes in ((n, False), (n + 100, True)):
            x, t, ids, noise = _batch(model.unet, micro)
            share = slice(rank, rank + 1)
            with micro_batch(accelerator, target.modules(), closes), torch.enable_grad():
                accelerator.backward(torch.nn.functional.mse_loss(
                    _predict(target.unet, encoder, x[share], t[share], ids[share]), noise[share]) / 2)
        norm = float(accelerator.clip_grad_norm_(params, 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if reference is not None:
            assert abs(norm - reference.step(n, n + 100)) < 1e-5 * norm

    step(0)
    if train_te:
        accumulated_step(1)
    else:
        step(1)
    with pytest.raises(RuntimeError, match="inside Weights.gathered"):
        weights.full(target.unet).__enter__()
    x, t, ids, _ = _batch(model.unet, 99)

    def on_main():  # the main process alone: the whole weights, a forward pass (validation, samples), a save
        whole = full_weights()
        assert_matches(whole, reference.weights())
        with torch.no_grad(), target.eval_view(weights) as (unet, trained_encoder):
            assert (trained_encoder is not None) == train_te
            torch.testing.assert_close(_predict(unet, trained_encoder or encoder, x, t, ids),
                                       _predict(reference.unet, reference.encoder, x, t, ids), atol=1e-5, rtol=1e-4)
        if train_te:
            return whole
        target.save(lambda stem: tmp / f"{stem}.safetensors", "fsdp", step=2, weights=weights, metadata={})
        save_trained(_replace(model, reference.unet), tmp / "reference.safetensors", fmt="safetensors",
                     precision="float", metadata={})
        assert_matches(load_file(tmp / "fsdp.safetensors"), load_file(tmp / "reference.safetensors"))
        return whole

    after_two = weights.on_main(on_main)
    assert (after_two is None) == (rank != 0)  # the work ran on the main process only
    sums = weights.checksums([target.unet])
    assert sums[0] == sums[1]
    if train_te:
        return
    # a sharded training state, written by every process, checked and loaded by sdtune's state code;
    # training goes on after each gathering as if nothing had happened
    state.save_state(accelerator, tmp / "state", state.Position(global_step=2), {})
    step(2)
    after_three = weights.on_main(full_weights)
    if rank == 0:
        assert_matches(after_three, reference.weights(), atol=5e-6)
    assert state.load_state(accelerator, tmp / "state").global_step == 2
    resumed = weights.on_main(full_weights)
    step(2, compare=False)  # the optimizer's momentum came back too: the same step gives the same weights
    again = weights.on_main(full_weights)
    if rank == 0:
        assert_matches(resumed, after_two, atol=0)
        assert_matches(again, after_three, atol=0)


def _replace(model, unet):
    import dataclasses

    return dataclasses.replace(model, unet=unet)


def _world(rank: int, init: str, tmp: str) -> None:
    from pathlib import Path

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # joins the group made above (accelerate's MULTI_CPU)
    assert accelerator.num_processes == 2
    try:
        for reshard, train_te in ((True, False), (False, True)):  # full shard, then shard-grad-op
            folder = Path(tmp) / ("full_shard" if reshard else "shard_grad_op")
            folder.mkdir(exist_ok=True)
            _sharded_run(accelerator, reshard, folder, rank, train_te)
    except BaseException:
        # the main process's failure is the telling one, yet another process may stop first
        (Path(tmp) / f"failure-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_training_saves_samples_and_resumes_like_an_unsharded_run(tmp_path):
    import torch.multiprocessing as mp

    try:
        mp.spawn(_world, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessRaisedException:
        failures = sorted(tmp_path.glob("failure-*.txt"))
        pytest.fail("\n".join(f.read_text() for f in failures), pytrace=False)
