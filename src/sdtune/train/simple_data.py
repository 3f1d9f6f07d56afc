"""INTERIM data path for the first training run: metadata JSON + image folder, one fixed
resolution, centre crop. Replaced by sdtune.data (buckets, latent cache) when that lands."""

from __future__ import annotations

import json
from pathlib import Path

from sdtune.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_samples(in_json: str, train_data_dir: str | None) -> list[tuple[Path, str]]:
    path = Path(in_json)
    if not path.is_file():
        raise UserError("metadata file not found", where=str(path), fix="Check --in_json.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"not valid JSON ({exc})", where=str(path)) from None
    root = Path(train_data_dir) if train_data_dir else None
    samples, missing = [], []
    for key, value in meta.items():
        image = _resolve(key, root)
        if image is None:
            missing.append(key)
            continue
        parts = [p for p in (value.get("caption"), value.get("tags")) if p]
        samples.append((image, ", ".join(parts)))
    if missing:
        listed = ", ".join(missing[:10])
        raise UserError(f"{len(missing)} images in the metadata were not found: {listed}", where=str(path),
                        fix="Check --train_data_dir.")
    if not samples:
        raise UserError("the metadata lists no images", where=str(path))
    return samples


def _resolve(key: str, root: Path | None) -> Path | None:
    p = Path(key)
    if not p.is_absolute():
        if root is None:
            return None
        p = root / p
    if p.is_file():
        return p
    for ext in IMAGE_EXTENSIONS:
        for cand in (p.with_name(p.name + ext), p.with_name(p.name + ext.upper())):
            if cand.is_file():
                return cand
    return None


def load_pixels(path: Path, width: int, height: int):
    """Resize to cover (width, height), centre crop, as a (3, H, W) tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        scale = max(width / img.width, height / img.height)
        size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        img = img.resize(size, Image.LANCZOS if scale > 1 else Image.BOX)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
