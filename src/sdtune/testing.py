"""Tiny, randomly initialised Stable Diffusion models and synthetic datasets.

Used by the tests, `sdtune demo` and the benchmarks. The models are built from the same shipped
configs as the real families (sdtune/assets) with only the widths shrunk: the U-Net keeps SD's
4-level block layout with SD1's 1:2:4:4 width ratio and two layers per block, the VAE keeps its
4 levels (so the real 8x downsampling), and the text encoders keep the real tokenizer and
vocabulary. Checkpoint key sets are therefore the real ones.

Everything is deterministic from a seed, and the global RNG is left as it was.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from sdtune.families import Family, get_family

# Width overrides applied to the shipped configs. Keeping the ratios is what keeps the key set.
_TINY_UNET = {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "sample_size": 8}
_TINY_VAE = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "sample_size": 64}
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 4,
              "projection_dim": 32}


def tiny_config(family: Family | str, component: str) -> dict[str, Any]:
    """The shipped config of `component` ("unet", "vae", "text_encoder") with tiny widths."""
    fam = get_family(family) if isinstance(family, str) else family
    name = "config.json"
    config = json.loads((fam.asset_dir / component / name).read_text())
    if component == "unet":
        config.update(_TINY_UNET)
        config["cross_attention_dim"] = _TINY_TEXT["hidden_size"]
        # SD1 counts heads (8 everywhere); SD2 keeps a constant head width: heads grow with channels.
        config["attention_head_dim"] = [1, 2, 4, 4] if fam.v2 else 2
    elif component == "vae":
        config.update(_TINY_VAE)
    elif component == "text_encoder":
        config.update(_TINY_TEXT)
    else:
        raise ValueError(component)
    return config


def build_tiny_model(family: Family | str = "sd1", seed: int = 0, unet: dict[str, Any] | None = None):
    """An `SDModel` with random weights, the real tokenizer and the family's scheduler config; `unet`
    overrides entries of the tiny U-Net's config (e.g. wider `block_out_channels`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdtune.model import SDModel

    fam = get_family(family) if isinstance(family, str) else family
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({**tiny_config(fam, "unet"), **(unet or {})})
        vae = AutoencoderKL.from_config(tiny_config(fam, "vae"))
        te_config = {k: v for k, v in tiny_config(fam, "text_encoder").items() if k not in ("architectures", "model_type")}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
        _randomize_layer_norms(text_encoder)
    tokenizer = CLIPTokenizer.from_pretrained(fam.asset_dir / "tokenizer")
    scheduler_config = json.loads((fam.asset_dir / "scheduler" / "scheduler_config.json").read_text())
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDModel(fam, unet, vae, text_encoder, tokenizer, scheduler_config, source=f"tiny random {fam.name} (seed {seed})",
                   detection="built by sdtune.testing")


def _randomize_layer_norms(module) -> None:
    """Give every LayerNorm a random scale and shift, as trained encoders have.

    Freshly initialised LayerNorms have weight 1 and bias 0, so the encoder's output has mean
    exactly 0 per position: rules that divide by a mean (A1111's weighted-prompt rescaling) would
    divide 0 by 0, and tests of them could not fail. Draws come from the caller's (forked) RNG.
    """
    import torch

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1.0 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))


def write_tiny_model(path: str | Path, family: Family | str = "sd1", seed: int = 0, fmt: str | None = None,
                     unet: dict[str, Any] | None = None) -> Path:
    """Build a tiny model (`unet`: see build_tiny_model) and write it as a Diffusers folder or an
    original-layout single file.

    `fmt` is taken from the suffix when not given: ".safetensors" / ".ckpt" write a single file,
    anything else a Diffusers folder.
    """
    from sdtune import checkpoint

    path = Path(path)
    if fmt is None:
        fmt = {".safetensors": "safetensors", ".ckpt": "ckpt"}.get(path.suffix, "diffusers")
    checkpoint.save_model(build_tiny_model(family, seed, unet=unet), path, fmt=fmt)
    return path


def write_training_workspace(root: str | Path, n: int = 4, seed: int = 0) -> Path:
    """The folder a training test runs in: a tiny SD1 Diffusers model in `model/`, `n` synthetic
    images in `data/` and their metadata in `meta.json` (see `make_dataset`)."""
    root = Path(root)
    write_tiny_model(root / "model", "sd1", seed=seed, fmt="diffusers")
    make_dataset(root / "data", n=n, seed=seed, metadata=root / "meta.json")
    return root


# ---------------------------------------------------------------------------------------------
# Synthetic datasets

_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
            "white": (245, 245, 245), "black": (20, 20, 20), "purple": (140, 50, 170), "orange": (240, 140, 30)}
_SHAPES = ("circle", "square", "triangle")
# (width, height) and file format: varied aspect ratios and encodings.
_LAYOUTS = [((96, 64), "png"), ((64, 96), "jpg"), ((80, 80), "webp"), ((128, 64), "png"),
            ((64, 128), "jpg"), ((72, 96), "png"), ((96, 72), "jpg"), ((64, 64), "bmp")]


def make_dataset(directory: str | Path, n: int = 8, seed: int = 0, metadata: str | Path | None = None,
                 tags: bool = True) -> dict[str, dict]:
    """Write `n` synthetic images with `.caption` (sentence) and, with `tags`, `.txt` (tags) files.

    Each image is one coloured shape on a coloured background, described by its caption and tags,
    so a model can learn the conditioning. Returns the sd-scripts metadata dict keyed by file stem;
    written as JSON to `metadata` when given.
    """
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(_COLOURS)
    meta: dict[str, dict] = {}
    for i in range(n):
        (w, h), ext = _LAYOUTS[i % len(_LAYOUTS)]
        fg, bg = rng.sample(names, 2)
        shape = rng.choice(_SHAPES)
        img = Image.new("RGB", (w, h), _COLOURS[bg])
        draw = ImageDraw.Draw(img)
        s = min(w, h)
        cx, cy = rng.randint(s // 3, w - s // 3), rng.randint(s // 3, h - s // 3)
        r = rng.randint(s // 6, s // 3)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=_COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=_COLOURS[fg])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_COLOURS[fg])
        stem = f"img_{i:03d}"
        img.save(directory / f"{stem}.{ext}", quality=95) if ext == "jpg" else img.save(directory / f"{stem}.{ext}")
        caption = f"{'an' if fg[0] in 'aeiou' else 'a'} {fg} {shape} on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background"
        (directory / f"{stem}.caption").write_text(caption + "\n")
        tag_text = f"{fg} {shape}, {bg} background, simple background"
        if tags:
            (directory / f"{stem}.txt").write_text(tag_text + "\n")
        meta[stem] = {"caption": caption, "tags": tag_text, "image_size": [w, h]} if tags else \
            {"caption": caption, "image_size": [w, h]}
    if metadata is not None:
        Path(metadata).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------
# Tiny data-preparation models: an ONNX tagger and a BLIP captioner

def write_onnx_tagger(folder: str | Path, labels: list[tuple[str, int]], weights, bias, *, size: int = 16,
                      batch: int | str = "N", scale: float = 1 / 255) -> Path:
    """A WD14-layout tagger folder (model.onnx + selected_tags.csv) whose model is a real ONNX graph:
    the mean colour of the NHWC input (B, G, R order, as WD14 models take it) times `scale`, a linear
    layer (`weights` is 3 x len(labels)), clipped to 0..1. Built with onnx.helper, no export needed."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    x = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, size, size, 3])
    y = helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, n])
    inits = [numpy_helper.from_array(np.asarray(weights, dtype=np.float32)[:, :n].copy(), "w"),
             numpy_helper.from_array(np.asarray(bias, dtype=np.float32)[:n].copy(), "b"),
             numpy_helper.from_array(np.array(scale, dtype=np.float32), "s"),
             numpy_helper.from_array(np.array(0, dtype=np.float32), "lo"),
             numpy_helper.from_array(np.array(1, dtype=np.float32), "hi")]
    nodes = [helper.make_node("ReduceMean", ["input_1"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("Mul", ["m", "s"], ["ms"]),
             helper.make_node("MatMul", ["ms", "w"], ["l"]),
             helper.make_node("Add", ["l", "b"], ["lb"]),
             helper.make_node("Clip", ["lb", "lo", "hi"], ["predictions_sigmoid"])]
    model = helper.make_model(helper.make_graph(nodes, "tiny_tagger", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},{1000 - i}" for i, (name, cat) in enumerate(labels)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


def write_colour_tagger(folder: str | Path) -> Path:
    """A tagger that rates every image "general", tags it "simple_background", plus the colour channels
    that dominate it (red, green, blue): a stand-in with the real WD14 file layout for the demo."""
    import numpy as np

    labels = [("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
              ("red_theme", 0), ("green_theme", 0), ("blue_theme", 0), ("simple_background", 0)]
    weights = np.zeros((3, len(labels)), dtype=np.float32)
    # input channels are B, G, R; a channel's tag fires when it is clearly above the others' mean
    for tag, channel in ((4, 2), (5, 1), (6, 0)):
        weights[:, tag] = -0.5
        weights[channel, tag] = 1.0
    bias = np.array([0.9, 0, 0, 0, 0.1, 0.1, 0.1, 0.9], dtype=np.float32)
    return write_onnx_tagger(folder, labels, weights, bias)


BLIP_WORDS = "a picture of red green blue cat dog on the with and square circle background".split()


def write_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """A randomly initialised BlipForConditionalGeneration with a small WordPiece vocabulary, saved
    with its tokenizer and (torchvision-free) image processor, as `sdtune caption` loads it."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder = Path(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + BLIP_WORDS
    # transformers 5 ignores vocab_file= silently; a vocab dict builds the WordPiece model offline.
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]")
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab.index("[DEC]"),
                pad_token_id=0, sep_token_id=vocab.index("[SEP]"), eos_token_id=vocab.index("[SEP]"))
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    # save_pretrained asks accelerate whether the model is a DeepSpeed engine, which imports DeepSpeed,
    # and DeepSpeed then logs that it found no GPU: on a machine without one, name the CPU for it
    quiet = not torch.cuda.is_available() and "deepspeed" not in sys.modules and "DS_ACCELERATOR" not in os.environ
    if quiet:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        model.save_pretrained(folder)
    finally:
        if quiet:
            del os.environ["DS_ACCELERATOR"]
    tokenizer.save_pretrained(folder)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
