"""Sample images during training: the run's prompts through the model being trained.

Why not `StableDiffusionPipeline`: the pipeline tokenises and encodes prompts its own way (77
tokens, no clip skip, no prompt weights), and sd-scripts' sampler likewise differs from its trainer
(up to 3 chunks whatever --max_token_length says, every chunk's BOS and EOS kept, EOS padding
even for SD2, weights renormalised by their mean). Here the prompt *and* the negative prompt go through the run's
`TextConditioner.encode`, the very function training uses, so a sample shows what training taught.
No negative prompt means the empty prompt's embedding, which is what caption dropout trains on.
The denoising loop below is the textbook one, with diffusers' schedulers doing the maths.

Determinism: the initial latents and any ancestral noise come from a CPU `torch.Generator` seeded by
the prompt's `--d` seed or, without one, by a seed derived from (run seed, prompt index). That seed
is in the file name, and passing it as `--d` reproduces the image. The same seed gives the same
image at every sampling point, so the images show the model changing, not the noise. The global RNG
is never touched. The module imports no torch at the top (option validation reads SAMPLERS).
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sdtune.atomic import atomic_path
from sdtune.errors import UserError
from sdtune.seeds import sample_image_seed
from sdtune.train.prompts import SamplePrompt, round_size
from sdtune.train.samplers import SAMPLER_ALIASES, SAMPLERS, normalize_sampler

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from sdtune.model import SDModel
    from sdtune.text.encode import TextConditioner

__all__ = ["SAMPLERS", "SAMPLER_ALIASES", "normalize_sampler", "build_scheduler", "SampleSchedule",
           "check_sampling_options", "sample_tag", "prompt_seed", "image_path", "grid_path", "sample_images", "generate",
           "SampleFiles"]

log = logging.getLogger(__name__)


def build_scheduler(scheduler_config: dict[str, Any], prediction_type: str, sampler: str):
    """A diffusers scheduler for `sampler` with the model's betas and prediction type.

    Built from the model's own scheduler config (betas, timestep spacing, steps offset), so the
    sampler sees the schedule the model was trained with; v-prediction models sample as v.
    sd-scripts instead hard-codes SD's betas and forces `clip_sample=True`, which clips latents to
    [-1, 1] in DDIM/DDPM; SD's own configs say False, and so do we.
    """
    import diffusers

    name = normalize_sampler(sampler)
    cls_name, extra = SAMPLERS[name]
    if cls_name == "LMSDiscreteScheduler":
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise UserError(f"the {name} sampler needs scipy, which is not installed", where="sampler",
                            fix="pip install scipy, or use euler / dpmsolver++ instead.")
    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config.update(extra, prediction_type=prediction_type)
    accepted = set(inspect.signature(cls.__init__).parameters)
    # Keys of another scheduler class (e.g. DDIM's set_alpha_to_one for Euler) are dropped quietly,
    # as diffusers would, but without its log line for each sample.
    with warnings.catch_warnings():
        # diffusers deprecates algorithm_type "dpmsolver"; sd-scripts' name must keep working meanwhile.
        warnings.simplefilter("ignore", FutureWarning)
        return cls.from_config({k: v for k, v in config.items() if k in accepted})


@dataclass(frozen=True)
class SampleSchedule:
    """When to sample, with sd-scripts' rules (`sample_images` in its library/train_util.py).

    `every_n_epochs` overrides `every_n_steps` as in sd-scripts: with both set, only epoch ends
    sample. Steps count optimizer steps from 1; epochs count from 1.
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.at_first or self.every_n_steps or self.every_n_epochs)

    def at_start(self) -> bool:
        return self.at_first

    def after_step(self, step: int) -> bool:
        return not self.every_n_epochs and bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0

    def after_epoch(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch > 0 and epoch % self.every_n_epochs == 0


def check_sampling_options(sample_prompts: str | None, every_n_steps: int | None, every_n_epochs: int | None,
                           at_first: bool) -> list[str]:
    """Refuse triggers without prompts; return notices for settings that do less than they seem to."""
    triggers = [f for f, v in (("--sample_every_n_steps", every_n_steps), ("--sample_every_n_epochs", every_n_epochs),
                               ("--sample_at_first", at_first)) if v]
    if triggers and not sample_prompts:
        raise UserError(f"{triggers[0]} is set but no prompts are given", where="--sample_prompts",
                        fix="Pass --sample_prompts prompts.txt (or .toml / .json).")
    notices = []
    if sample_prompts and not triggers:
        notices.append("--sample_prompts is given but nothing triggers sampling; add --sample_every_n_steps N, "
                       "--sample_every_n_epochs N or --sample_at_first")
    if every_n_steps and every_n_epochs:
        notices.append("--sample_every_n_epochs overrides --sample_every_n_steps (as in sd-scripts): "
                       "samples are made at epoch ends only")
    return notices


def sample_tag(*, step: int | None = None, epoch: int | None = None) -> str:
    """sd-scripts' file-name tag: `e000003` for an epoch end, `000120` for a step."""
    if epoch is not None:
        return f"e{epoch:06d}"
    if step is None:
        raise ValueError("give a step or an epoch")
    return f"{step:06d}"


def prompt_seed(prompt: SamplePrompt, run_seed: int) -> int:
    """The prompt's own seed, or one derived from (run seed, prompt index): 32 bits, to type as --d."""
    if prompt.seed is not None:
        return prompt.seed
    return sample_image_seed(run_seed, prompt.index)


def image_path(out_dir: str | Path, name: str | None, tag: str, prompt: SamplePrompt, seed: int) -> Path:
    """Where `sample_images` writes `prompt`'s image: `<out_dir>/[<name>_]<tag>_<index:02d>_<seed>.png`,
    `seed` being the image's own (`prompt_seed`)."""
    return Path(out_dir) / f"{name + '_' if name else ''}{tag}_{prompt.index:02d}_{seed}.png"


def grid_path(out_dir: str | Path, name: str | None, tag: str) -> Path:
    """Where `sample_images` writes the grid of one sampling point: `<out_dir>/[<name>_]<tag>_grid.png`."""
    return Path(out_dir) / f"{name + '_' if name else ''}{tag}_grid.png"


class SampleFiles(list):
    """The images written at one sampling point, in prompt order; `.grid` is the grid PNG."""

    grid: Path | None = None


def sample_images(model: "SDModel", conditioner: "TextConditioner", prompts: Sequence[SamplePrompt], *,
                  sampler: str, out_dir: str | Path, name: str | None, tag: str, device, seed: int,
                  dtype: "torch.dtype | None" = None, progress: bool = True, grid: bool = True) -> SampleFiles:
    """Generate one PNG per prompt plus a grid (unless `grid` is False), named as sd-scripts names
    them (without its timestamp): `image_path` and `grid_path`; existing files are replaced.

    `model.unet`, `model.vae` and the conditioner's text encoder are used as they are (wrappers like
    DDP are looked through, so only this process runs them); each module is put in eval mode and
    moved to `device` for the duration, then restored. `dtype` runs the U-Net and VAE under autocast.
    """
    import copy

    import torch
    from tqdm.auto import tqdm

    from sdtune.text.encode import unwrap_module

    if not prompts:
        raise ValueError("no prompts to sample")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # so "cuda" equals a param's "cuda:0"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    default_sampler = normalize_sampler(sampler)
    unet, vae = unwrap_module(model.unet), unwrap_module(model.vae)
    # The same conditioner (tokeniser, clip skip, weighting, chunk count), calling the bare
    # encoder so a DDP wrapper on a trained text encoder does not wait for the other processes;
    # a copy so sample prompts do not count in training's truncation report.
    text = copy.copy(conditioner)
    text.text_encoder = unwrap_module(conditioner.text_encoder)
    files = SampleFiles()
    images = []
    with _inference_mode([unet, vae, text.text_encoder], device):
        for prompt in tqdm(prompts, desc=f"samples {tag}", leave=False, disable=not progress, dynamic_ncols=True):
            cond = _encode(text, prompt.prompt, prompt)
            uncond = _encode(text, prompt.negative_prompt or "", prompt) if prompt.scale != 1 else None
            this_seed = prompt_seed(prompt, seed)
            width = round_size(prompt.width or model.family.resolution)
            height = round_size(prompt.height or model.family.resolution)
            sampler_name = prompt.sampler or default_sampler
            scheduler = build_scheduler(model.scheduler_config, model.family.prediction_type, sampler_name)
            image = generate(unet, vae, scheduler, cond, uncond, width=width, height=height, steps=prompt.steps,
                             scale=prompt.scale, generator=torch.Generator().manual_seed(this_seed), device=device,
                             dtype=dtype)
            path = image_path(out_dir, name, tag, prompt, this_seed)
            _save_png(image, path, _parameters(prompt, sampler_name, this_seed, width, height))
            files.append(path)
            images.append((image, prompt.prompt))
    if grid:
        files.grid = grid_path(out_dir, name, tag)
        _save_png(make_grid(images), files.grid)
    return files


_warned_long: set[tuple[str, int]] = set()


def _encode(text: "TextConditioner", prompt: str, sample: SamplePrompt) -> "torch.Tensor":
    batch = text.chunker([prompt])
    limit = text.max_token_length
    if batch.lengths[0] > limit and (prompt, limit) not in _warned_long:
        _warned_long.add((prompt, limit))
        log.warning("%s: sample prompt has %d tokens and is cut to %d, as training captions are; "
                    "raise --max_token_length to keep more", sample.where or f"prompt {sample.index}",
                    batch.lengths[0], limit)
    return text.encode(batch)


def generate(unet, vae, scheduler, cond: "torch.Tensor", uncond: "torch.Tensor | None", *, width: int, height: int,
             steps: int, scale: float, generator: "torch.Generator", device, dtype=None) -> "Image.Image":
    """Denoise from seeded noise with classifier-free guidance and decode to a PIL image.

    `uncond` None (with scale 1) skips the unconditional pass. Noise is drawn on the CPU
    generator and then moved, so the same seed gives the same image on any device.
    """
    import torch
    from PIL import Image

    from sdtune.model import denoise

    device = torch.device(device)
    channels = unet.config.in_channels
    if channels != vae.config.latent_channels:
        raise UserError(f"the U-Net takes {channels} input channels (an inpainting or other special model); "
                        "sampling supports plain text-to-image models", where="sampling")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, channels, height // factor, width // factor)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    context = cond if uncond is None else torch.cat([uncond, cond])
    context = context.to(device, unet.dtype)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None and dtype != torch.float32
                else nullcontext())
    with autocast:
        for t in scheduler.timesteps:
            model_in = latents if uncond is None else torch.cat([latents, latents])
            model_in = scheduler.scale_model_input(model_in, t).to(unet.dtype)
            pred = denoise(unet, model_in, t, context).float()
            if uncond is not None:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + scale * (pred_cond - pred_uncond)
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        decoded = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    pixels = (decoded[0].float() / 2 + 0.5).clamp(0, 1)
    if not torch.isfinite(decoded).all():
        log.warning("a sample decoded to NaN/inf (black image); with fp16 this is usually the VAE: try bf16")
    array = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


@contextmanager
def _inference_mode(modules, device):
    """Eval mode, `device` and no autograd for the duration; every submodule's mode and device restored."""
    import torch

    modes = [(m, m.training) for module in modules for m in module.modules()]
    moved = []
    for module in modules:
        param = next(module.parameters(), None)
        if param is not None and param.device != device:
            moved.append((module, param.device))
            module.to(device)
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for module, original in moved:
            module.to(original)


def _parameters(prompt: SamplePrompt, sampler: str, seed: int, width: int, height: int) -> str:
    """A1111's "parameters" text, so UIs that read PNG info show how the sample was made."""
    lines = [prompt.prompt]
    if prompt.negative_prompt:
        lines.append(f"Negative prompt: {prompt.negative_prompt}")
    lines.append(f"Steps: {prompt.steps}, Sampler: {sampler}, CFG scale: {prompt.scale:g}, Seed: {seed}, "
                 f"Size: {width}x{height}")
    return "\n".join(lines)


def _save_png(image: "Image.Image", path: Path, parameters: str | None = None) -> None:
    from PIL import PngImagePlugin

    info = None
    if parameters:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def make_grid(images: Sequence[tuple["Image.Image", str]], caption_lines: int = 2) -> "Image.Image":
    """The images in a near-square grid, each over its prompt (cut to `caption_lines` lines)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w = max(im.width for im, _ in images)
    cell_h = max(im.height for im, _ in images)
    line_h = 12
    band = caption_lines * line_h + 6
    grid = Image.new("RGB", (cols * cell_w, rows * (cell_h + band)), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, int(cell_w / max(1.0, font.getlength("x"))))
    for i, (im, caption) in enumerate(images):
        x, y = (i % cols) * cell_w, (i // cols) * (cell_h + band)
        grid.paste(im, (x + (cell_w - im.width) // 2, y + (cell_h - im.height) // 2))
        lines = textwrap.wrap(caption, chars, max_lines=caption_lines, placeholder="...") or [""]
        for j, line in enumerate(lines):
            draw.text((x + 3, y + cell_h + 3 + j * line_h), line, fill="black", font=font)
    return grid
