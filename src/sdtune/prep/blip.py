"""`caption_images`: BLIP captions through transformers' BlipForConditionalGeneration.

Like sd-scripts' make_captions.py: the decoder starts from the prompt "a picture of " (stripped
from the result), decodes with nucleus sampling (top_p 0.9, repetition penalty 1.1) or, with
beam search, `num_beams` beams (repetition penalty 1.0), and writes `<stem>.caption`. Unlike it,
the model is transformers' port (no vendored BLIP, timm or fairscale), images go through the
model's own BlipImageProcessorPil (PIL only: the default BLIP image processor needs torchvision,
which does not work with the CPU torch here), and sampling is seeded without touching the
global RNG.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from sdtune.atomic import atomic_write_text
from sdtune.errors import UserError
from sdtune.prep.files import find_images, load_image, normalize_extension, prefetch_batches, sidecar
from sdtune.prep.tagger import TagResult

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"


@dataclass(frozen=True)
class BlipOptions:
    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5
    repetition_penalty: float | None = None  # None: 1.1 when sampling, 1.0 with beams (sd-scripts)
    prompt: str = "a picture of "
    seed: int = 42

    def __post_init__(self):
        if self.num_beams < 1:
            raise UserError(f"must be at least 1, got {self.num_beams}", where="--num_beams")
        if not 0 < self.top_p <= 1:
            raise UserError(f"must be in (0, 1], got {self.top_p}", where="--top_p")
        if self.min_length < 0 or self.max_length < 1:
            raise UserError("lengths must be positive", where="--max_length/--min_length")
        if self.min_length > self.max_length:
            raise UserError(f"--min_length {self.min_length} is above --max_length {self.max_length}",
                            where="--min_length")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise UserError("must be > 0", where="--repetition_penalty")

    def generate_kwargs(self) -> dict:
        if self.beam_search:
            kw = dict(num_beams=self.num_beams, do_sample=False,
                      repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty)
        else:
            kw = dict(do_sample=True, top_p=self.top_p, top_k=0, num_beams=1,
                      repetition_penalty=1.1 if self.repetition_penalty is None else self.repetition_penalty)
        return dict(kw, max_length=self.max_length, min_length=self.min_length)


@dataclass
class Captioner:
    model: object
    image_processor: object
    tokenizer: object
    device: str


def load_captioner(model: str = DEFAULT_MODEL, device: str | None = None) -> Captioner:
    """BLIP from a local folder or a hub id; offline and absent, a UserError naming what to download."""
    local = Path(model).expanduser()
    if not local.is_dir() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise UserError("neither a folder nor a hub repository id (owner/name)", where=f"--model_id {model}")
    source = str(local) if local.is_dir() else model
    hub = {}
    if source == model:
        from huggingface_hub import is_offline_mode

        from sdtune.checkpoint.hub import cache_only

        if not is_offline_mode():  # (offline, the error below names what to fetch)
            hub = {"local_files_only": cache_only(model, where="--model_id")}  # unreachable: in seconds

    import torch
    from transformers import AutoTokenizer, BlipForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    try:
        image_processor = BlipImageProcessorPil.from_pretrained(source, **hub)
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
        net = BlipForConditionalGeneration.from_pretrained(source, **hub)
    except OSError as exc:
        if local.is_dir():
            raise UserError(f"not a complete BLIP folder ({str(exc).splitlines()[0]})", where=str(local),
                            fix="It needs config.json, the weights, preprocessor_config.json and the tokenizer files "
                                "(save_pretrained of the model and its BlipProcessor).") from exc
        from sdtune.prep.hub import hub_error

        raise hub_error(model, ["the model"], "--model_id", exc) from exc
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device).eval()
    return Captioner(net, image_processor, tokenizer, device)


def caption_images(image_dir: str | Path, captioner: Captioner, *, options: BlipOptions = BlipOptions(),
                   caption_extension: str = ".caption", recursive: bool = False, batch_size: int = 1,
                   num_workers: int = 0, overwrite: bool = False, progress: bool = True) -> TagResult:
    """Caption every image without a caption file (all of them with `overwrite`).

    Sampling is seeded per batch from (seed, name of the batch's first image), so with batch size 1
    an image gets the same caption whatever else is in the folder or was skipped; the global RNG is
    left alone.
    """
    import torch
    from tqdm import tqdm

    from sdtune.prep.files import flatten_on_white

    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}", where="--batch_size")
    caption_extension = normalize_extension(caption_extension)
    images = find_images(image_dir, recursive)
    result = TagResult()
    todo = []
    for image in images:
        (result.skipped_existing if sidecar(image, caption_extension).exists() and not overwrite else todo).append(image)

    prompt = options.prompt
    prompt_ids = captioner.tokenizer(prompt.strip(), return_tensors="pt").input_ids if prompt.strip() else None
    kwargs = options.generate_kwargs()
    devices = [torch.cuda.current_device()] if captioner.device.startswith("cuda") else []
    bar = tqdm(total=len(todo), unit="img", desc="captioning", disable=not progress or not todo, dynamic_ncols=True)
    try:
        for loaded in prefetch_batches(todo, lambda p: (p, load_image(p)), batch_size, num_workers):
            result.unreadable += [p for p, img in loaded if img is None]
            ok = [(p, flatten_on_white(img)) for p, img in loaded if img is not None]
            if ok:
                pixels = captioner.image_processor([img for _, img in ok], return_tensors="pt")["pixel_values"]
                pixels = pixels.to(captioner.device, captioner.model.dtype)
                input_ids = prompt_ids.repeat(len(ok), 1).to(captioner.device) if prompt_ids is not None else None
                with torch.no_grad(), torch.random.fork_rng(devices=devices):
                    torch.manual_seed(_batch_seed(options.seed, ok[0][0]))
                    out = captioner.model.generate(pixel_values=pixels, input_ids=input_ids, **kwargs)
                for (image, _), ids in zip(ok, out):
                    text = captioner.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    text = _strip_prompt(text, prompt)
                    atomic_write_text(sidecar(image, caption_extension), text + "\n")
                    result.written.append(image)
            bar.update(len(loaded))
    finally:
        bar.close()
    return result


def _batch_seed(seed: int, first: Path) -> int:
    return (seed * 1_000_003 + zlib.crc32(first.name.encode("utf-8"))) % (2**63)


def _strip_prompt(text: str, prompt: str) -> str:
    p = prompt.strip().lower()
    if p and text.lower().startswith(p):
        return text[len(p):].strip()
    return text
