"""`sdtune sample`: images from a model, optionally with a hypernetwork at a chosen multiplier.

    sdtune sample --pretrained_model_name_or_path sd15.safetensors --hypernetwork style.pt \\
        --hypernetwork_multiplier 0.8 --prompt "a castle --n blurry --d 7" --output_dir samples

`--vae FILE` decodes with another VAE, as training's `--vae` does for a run's sample images.

The images are made exactly as training makes its sample images (train/sampling.py): the same
conditioning function (`TextConditioner.encode`, with --clip_skip, --max_token_length and
--weighted_captions), the same samplers, seeds and file naming, the U-Net and text encoder in the
compute precision of `--mixed_precision` as a frozen model is during training, and the
hypernetwork applied by the same hooks (sdtune.hypernetwork.apply) in float32. So a prompt file and
seed used during a run give, with the saved hypernetwork file, the run's own sample images.

Files are `<output_dir>/<tag>_<index:02d>_<seed>.png` (and `<tag>_grid.png` for several prompts),
the tag being `<hypernetwork file's stem>_x<multiplier>` or `base`; an existing file is never replaced
unless --overwrite is given, and that is checked before the model is loaded.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from pydantic import field_validator, model_validator

from sdtune.config import Field, add_options, parse_options
from sdtune.errors import UserError
from sdtune.train.options import ModelOptions, TrainingOptions

DEFAULT_SEED = 42  # training's implied --seed: the same prompts give the images a run sampled


def _as_in_training(name: str, group: str):
    """Training's own declaration of an option whose meaning must not differ here (shown under `group`)."""
    info = copy.deepcopy(TrainingOptions.model_fields[name])
    info.json_schema_extra = {**info.json_schema_extra, "group": group}
    return info


_MP = TrainingOptions.model_fields["mixed_precision"].annotation
_MTL = TrainingOptions.model_fields["max_token_length"].annotation


class SampleOptions(ModelOptions):
    pretrained_model_name_or_path: str | None = Field(
        None, "the model to sample: a .safetensors or .ckpt file, a Diffusers folder, or a hub id", group="Model",
        metavar="PATH")
    vae: str | None = Field(None, "a separate VAE (.safetensors/.ckpt file, Diffusers folder or hub id) that decodes "
                            "the images in place of the model's own, as --vae does in training", group="Model",
                            metavar="PATH")
    hypernetwork: str | None = Field(
        None, "apply this hypernetwork file (.pt from the web UI, sd-scripts or sdtune; or sdtune's .safetensors)",
        group="Hypernetwork", metavar="FILE")
    hypernetwork_multiplier: float | None = Field(
        None, "strength of the hypernetwork (the web UI's <hypernet:name:M>); 0 gives the model without it",
        group="Hypernetwork", implied=1.0, metavar="M")
    prompt: str | None = Field(None, "one prompt, in the --sample_prompts line syntax (options --n --w --h --s --l --d "
                               "--ss may follow it)", group="Prompts", metavar="TEXT")
    prompts: str | None = Field(None, "a prompt file in the --sample_prompts syntax (.txt, .toml or .json)",
                                group="Prompts", metavar="FILE")
    sampler: str = Field("ddim", "sampler of prompts without --ss (ddim, euler_a, dpmsolver++, dpm++_2m_karras, ...)",
                         group="Prompts")
    seed: int | None = Field(None, "seed of prompts without --d (a run's --seed gives its sample images)",
                             group="Prompts", implied=DEFAULT_SEED, ge=0)
    clip_skip: int | None = _as_in_training("clip_skip", "Text")
    max_token_length: _MTL = _as_in_training("max_token_length", "Text")
    weighted_captions: bool = _as_in_training("weighted_captions", "Text")
    mixed_precision: _MP = _as_in_training("mixed_precision", "Precision and device")
    device: str | None = Field(None, "device to sample on (default: cuda when available, else cpu)",
                               group="Precision and device")
    xformers: bool = _as_in_training("xformers", "Precision and device")
    mem_eff_attn: bool = _as_in_training("mem_eff_attn", "Precision and device")
    output_dir: str | None = Field(None, "folder for the images", group="Output", metavar="DIR")
    overwrite: bool = Field(False, "replace images of the same name (else an existing one stops the command)",
                            group="Output")

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, value: str) -> str:
        from sdtune.train.samplers import normalize_sampler

        return normalize_sampler(value, where="--sampler")

    @field_validator("hypernetwork_multiplier")
    @classmethod
    def _multiplier(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a finite number (1 = as trained, 0 = off), got {value}")
        return value

    @model_validator(mode="after")
    def _required(self):
        if not self.pretrained_model_name_or_path:
            raise UserError("no model given", where="--pretrained_model_name_or_path",
                            fix="Pass a .safetensors/.ckpt file, a Diffusers folder or a hub id.")
        if self.hypernetwork_multiplier is not None and not self.hypernetwork:
            raise UserError("a multiplier without a hypernetwork does nothing", where="--hypernetwork_multiplier",
                            fix="Add --hypernetwork FILE, or drop the multiplier.")
        if bool(self.prompt is not None) == bool(self.prompts):
            raise UserError("give either --prompt TEXT or --prompts FILE" if self.prompts else "no prompt given",
                            where="--prompt", fix="Pass --prompt \"...\" for one image or --prompts FILE for several.")
        if self.prompt is not None and not self.prompt.strip():
            raise UserError("the prompt is empty", where="--prompt",
                            fix='Give a text, e.g. --prompt "a photo of a cat" (--prompt "" --n ... is not possible).')
        if not self.output_dir:
            raise UserError("no output folder given", where="--output_dir", fix="Pass --output_dir DIR.")
        return self

    @property
    def multiplier(self) -> float:
        return self.resolved("hypernetwork_multiplier")


def add_arguments(parser) -> None:
    add_options(parser, SampleOptions)


def load_prompts(opts: SampleOptions) -> list:
    """The prompts of --prompt (one line of the prompt-file syntax) or --prompts FILE."""
    from sdtune.train import prompts

    if opts.prompts:
        return prompts.load_prompts(opts.prompts, flag="--prompts")
    return [prompts.prompt_from_dict(prompts.parse_prompt_line(opts.prompt.strip(), "--prompt"), 0, "--prompt")]


def tag_for(opts: SampleOptions) -> str:
    """The file names' tag: `<hypernetwork stem>_x<multiplier>`, or `base` without a hypernetwork."""
    if not opts.hypernetwork:
        return "base"
    return f"{Path(opts.hypernetwork).stem}_x{opts.multiplier:g}"


def planned_files(opts: SampleOptions, prompts: list) -> list[Path]:
    """The files the command writes, named as training names its samples (train/sampling.py)."""
    from sdtune.train.sampling import grid_path, image_path, prompt_seed

    seed, tag = opts.resolved("seed"), tag_for(opts)
    paths = [image_path(opts.output_dir, None, tag, p, prompt_seed(p, seed)) for p in prompts]
    return paths + ([grid_path(opts.output_dir, None, tag)] if len(prompts) > 1 else [])


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0].name} already exists{more}; nothing was written", where=str(existing[0].parent),
                        fix="Choose another --output_dir, or pass --overwrite to replace them.")


def prepare_output_dir(folder: str) -> None:
    """Create --output_dir now: a folder that cannot be made stops the command before the model loads."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError("is a file, not a folder", where=folder, fix="Choose a folder for --output_dir.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder ({exc.strerror})", where=folder,
                        fix="Choose another --output_dir.") from None


def device_and_dtype(opts: SampleOptions, note):
    """The device and the compute dtype, chosen as training chooses them (fp16 needs CUDA)."""
    import torch

    try:
        device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"not a device: {opts.device!r}", where="--device", fix="Use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine", where="--device", fix="Use --device cpu.")
    precision = opts.mixed_precision
    if precision == "fp16" and device.type != "cuda":
        note("note: fp16 mixed precision needs a CUDA GPU; sampling in float32 on the CPU instead "
             "(--mixed_precision bf16 works on CPUs)")
        precision = "no"
    return device, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def load_hypernetwork(opts: SampleOptions, device):
    """The file's hypernetwork in float32 (as training applies it), in eval mode, at --hypernetwork_multiplier."""
    import torch

    from sdtune.hypernetwork import files

    hn = files.load(opts.hypernetwork, multiplier=opts.multiplier)
    return hn.to(device, torch.float32).eval().requires_grad_(False)


def check_widths(hn, model_widths: set[int], where: str, note) -> None:
    """Refuse a hypernetwork of which no module pair would act; say which pairs do not.

    Refused when none acts: the images would be the model's own whatever the multiplier, which is
    never what the user meant (it was made for another model). Some pairs acting (an SD 2.x file on
    SD 1.x shares the 320/640/1280 widths but not the text's 768/1024) is what the web UIs apply
    silently; it is allowed, with a note, because it does change the images, though not as on the
    model the file was made for.
    """
    from sdtune.console import plural

    acting = [w for w in hn.widths if w in model_widths]
    unused = [w for w in hn.widths if w not in model_widths]
    widths = ", ".join(str(w) for w in sorted(model_widths))
    if not acting:
        raise UserError(f"none of the hypernetwork's widths ({', '.join(map(str, hn.widths))}) is a context width of "
                        f"this model ({widths}), so it would change nothing", where=where,
                        fix="Use it with the model family it was made for (text width 768: SD 1.x, 1024: SD 2.x), "
                            "or drop --hypernetwork to sample the model alone.")
    if unused:
        note(f"note: {where}: its {plural(len(unused), 'module pair')} for width {', '.join(map(str, unused))} "
             f"never act on this model (its widths: {widths}): the file was probably made for another model family; "
             f"the pairs for {', '.join(map(str, acting))} act")


def run(args) -> int:
    from sdtune.console import note, quiet_libraries

    opts = parse_options(SampleOptions, args)
    quiet_libraries()  # diffusers' and transformers' notices, as training leaves them out
    prompts = load_prompts(opts)
    paths = planned_files(opts, prompts)
    refuse_existing(paths, opts.overwrite)
    device, dtype = device_and_dtype(opts, note)
    hn = load_hypernetwork(opts, device) if opts.hypernetwork else None  # a bad file fails before the model loads
    prepare_output_dir(opts.output_dir)
    files = generate_images(opts, prompts, hn, device, dtype, note)
    for path in files:
        print(f"wrote {path}")
    if files.grid:
        print(f"wrote {files.grid}")
    return 0


def generate_images(opts: SampleOptions, prompts: list, hn, device, dtype, note):
    """Load the model as training loads it and sample `prompts` through training's sampler."""
    import contextlib
    import dataclasses
    from types import SimpleNamespace

    import torch

    from sdtune.checkpoint import load_model, load_vae
    from sdtune.hypernetwork import apply
    from sdtune.text import TextConditioner
    from sdtune.train import sampling
    from sdtune.train.setup import compute_copy, configure_attention, mem_eff_context

    model = load_model(opts.pretrained_model_name_or_path, v2=opts.v2 or None,
                       v_parameterization=opts.v_parameterization or None, use_ema_weights=opts.use_ema_weights,
                       dtype=torch.float32)
    if opts.vae:  # as training's --vae, which also makes that run's sample images
        model = dataclasses.replace(model, vae=load_vae(opts.vae, like=model.vae, dtype=torch.float32))
        note(f"vae: {opts.vae}")
    # frozen parts in the compute precision, as a hypernetwork run (or a frozen text encoder) holds them
    unet = compute_copy(model.unet.requires_grad_(False).eval(), device, dtype)
    text_encoder = compute_copy(model.text_encoder.requires_grad_(False).eval(), device, dtype)
    # training's attention set-up; its --diffusers_xformers is --xformers here
    configure_attention(unet, SimpleNamespace(xformers=opts.xformers, diffusers_xformers=False,
                                              mem_eff_attn=opts.mem_eff_attn), note)
    conditioner = TextConditioner(model.tokenizer, text_encoder, model.family, max_token_length=opts.max_token_length,
                                  clip_skip=opts.clip_skip, weighted=opts.weighted_captions)
    with contextlib.ExitStack() as stack:
        if hn is not None:
            check_widths(hn, apply.attention_widths(unet), opts.hypernetwork, note)
            stack.enter_context(apply.attach(unet, hn))
            note(f"hypernetwork: {opts.hypernetwork} ({hn.structure.describe()}; step {hn.info.step}) "
                 f"at multiplier {opts.multiplier:g}")
        stack.enter_context(mem_eff_context(opts))
        return sampling.sample_images(dataclasses.replace(model, unet=unet), conditioner, prompts,
                                      sampler=opts.sampler, out_dir=opts.output_dir, name=None, tag=tag_for(opts),
                                      device=device, seed=opts.resolved("seed"),
                                      dtype=dtype if dtype != torch.float32 else None, grid=len(prompts) > 1)
