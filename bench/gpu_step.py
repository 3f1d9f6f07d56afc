"""A real U-Net training step on a device, for bench/gpu_throughput.py and bench/gpu_memory.py.

The step is sdtune's for the U-Net alone: the one U-Net call (`sdtune.model.denoise`), autocast to
bf16 under `--mixed_precision bf16`, bf16 weights with stochastic rounding under `--full_bf16`,
diffusers' gradient checkpointing, gradient clipping at 1.0, sdtune's optimizer builder, gradients
freed after the step. The loss is the noise-prediction MSE of a random batch (the data and the text
encoder are not part of what is measured: with cached latents the step is the U-Net's). The model
has random weights built from the family's shipped Diffusers config (real size), or the tests' tiny
config for `--cpu-smoke`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from sdtune.train.memory_count import StepOptions

GIB = 1024 ** 3
# forward + backward FLOPs of one SD 1.5 U-Net sample at 512x512 (3x the forward's ~0.80 TFLOP)
SD15_TRAIN_FLOP_512 = 2.41e12
# dense bf16 peak of the chips the suite is meant for (NVIDIA's data sheets, SXM parts)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def unet_config(family: str, tiny: bool) -> dict:
    from diffusers import UNet2DConditionModel

    from sdtune.families import get_family
    from sdtune.testing import tiny_config

    if tiny:
        return tiny_config(family, "unet")
    return dict(UNet2DConditionModel.load_config(str(get_family(family).asset_dir / "unet")))


@dataclass
class Step:
    """One training configuration on `device`; `run(n)` makes n optimizer steps."""

    opts: StepOptions
    device: torch.device
    family: str = "sd1"
    tiny: bool = False
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0

        from sdtune.train import optim

        config = unet_config(self.family, self.tiny)
        torch.manual_seed(0)
        with torch.device(self.device):  # random init on the device: seconds instead of minutes on a CPU
            self.unet = UNet2DConditionModel.from_config(config)
        self.unet.set_attn_processor(AttnProcessor2_0())
        if self.opts.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if self.opts.full_bf16:
            self.unet.to(torch.bfloat16)
        self.unet.train()
        if self.compile:
            self.unet.compile(backend=self.compile_backend)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = optim.build_optimizer(self.opts.optimizer, [{"params": params, "lr": 1e-6}], 1e-6,
                                               list(self.opts.optimizer_args), note=None)
        if self.opts.full_bf16:
            optim.add_bf16_stochastic_rounding(self.optimizer, torch.Generator().manual_seed(0))
        side = self.opts.resolution // 8
        gen = torch.Generator().manual_seed(1)
        b = self.opts.batch_size
        self.latents = torch.randn(b, config["in_channels"], side, side, generator=gen).to(self.device)
        self.noise = torch.randn(b, config["in_channels"], side, side, generator=gen).to(self.device)
        self.cond = torch.randn(b, 77, config["cross_attention_dim"], generator=gen).to(self.device)
        self.timesteps = torch.randint(0, 1000, (b,), generator=gen).to(self.device)
        self.parameters = sum(p.numel() for p in params)

    def _autocast(self):
        if self.opts.mixed_precision == "bf16":
            return torch.autocast(self.device.type, torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, n: int) -> float:
        """n optimizer steps; the last loss."""
        from sdtune.model import denoise

        loss = torch.zeros(())
        for _ in range(n):
            with self._autocast():
                pred = denoise(self.unet, self.latents + self.noise, self.timesteps, self.cond)
            loss = torch.nn.functional.mse_loss(pred.float(), self.noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.opts.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, warmup: int, steps: int) -> dict:
        """Seconds for `warmup` steps (compilation included), then the steady state of `steps` more."""
        start = time.perf_counter()
        self.run(warmup)
        self.sync()
        warm = time.perf_counter() - start
        start = time.perf_counter()
        loss = self.run(steps)
        self.sync()
        seconds = time.perf_counter() - start
        return {"warmup_s": round(warm, 2), "step_ms": round(1000 * seconds / steps, 2),
                "samples_per_s": round(steps * self.opts.batch_size / seconds, 3), "loss": loss,
                "loss_finite": bool(torch.isfinite(torch.tensor(loss)))}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for chip, flops in PEAK_BF16_FLOPS.items() if chip in name), None)


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}
    props = torch.cuda.get_device_properties(device)
    return {"device": torch.cuda.get_device_name(device), "memory_gib": round(props.total_memory / GIB, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda}
