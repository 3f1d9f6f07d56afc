"""DeepDanbooru project folders with the model converted to ONNX.

Folder: `tags.txt` (one tag per line, in output order), optionally `tags-general.txt` and
`tags-character.txt` (category lists), `project.json` (image_width / image_height) and one
`*.onnx` model (see docs/prep.md for converting the released Keras .h5).

Preprocessing as DeepDanbooru's own evaluation loader: RGB (an alpha channel is dropped, as its
`decode_png(channels=3)` and A1111 do), area-resize to fit inside W x H keeping the aspect ratio
(TF rounds the scaled size), centre and pad by repeating the edge pixels, scale to 0..1, NHWC.
DeepDanbooru centres with a sub-pixel affine warp; we centre on whole pixels (left/top get the
smaller half), which differs by at most half a pixel on one axis.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdtune.errors import UserError
from sdtune.prep.files import read_text, to_8bit
from sdtune.prep.tags import CHARACTER, GENERAL, RATING


def preprocess(img, height: int, width: int) -> np.ndarray:
    """A PIL image -> float32 [height, width, 3], RGB, 0..1."""
    from PIL import Image

    rgb = to_8bit(img).convert("RGB")
    w, h = rgb.size
    scale = min(width / w, height / h)
    nw, nh = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.Resampling.BOX)
    arr = np.asarray(rgb, dtype=np.float32)
    top, left = (height - nh) // 2, (width - nw) // 2
    arr = np.pad(arr, ((top, height - nh - top), (left, width - nw - left), (0, 0)), mode="edge")
    return arr / np.float32(255.0)


def is_dd_folder(folder: Path) -> bool:
    return (folder / "tags.txt").is_file() and any(folder.glob("*.onnx"))


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def load_labels(folder: Path) -> list[tuple[str, int]]:
    """(name, category): "rating:*" tags are ratings; with tags-character.txt present, its tags are
    characters; everything else (general, copyright, meta) counts as general."""
    tags_file = folder / "tags.txt"
    if not tags_file.is_file():
        raise UserError("no tags.txt", where=str(folder), fix="Pass a DeepDanbooru project folder.")
    names = _lines(tags_file)
    if not names:
        raise UserError("tags.txt is empty", where=str(tags_file))
    characters = set(_lines(folder / "tags-character.txt")) if (folder / "tags-character.txt").is_file() else set()
    labels = []
    for name in names:
        if name.startswith("rating:"):
            labels.append((name, RATING))
        elif name in characters:
            labels.append((name, CHARACTER))
        else:
            labels.append((name, GENERAL))
    return labels


def model_file(folder: Path) -> Path:
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    found = sorted(folder.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError("no .onnx model in the DeepDanbooru folder", where=str(folder),
                        fix="Convert the Keras model to ONNX first (see docs/prep.md, 'DeepDanbooru').")
    raise UserError(f"several .onnx files: {', '.join(p.name for p in found)}", where=str(folder),
                    fix="Keep one, or name the one to use model.onnx.")


def project_size(folder: Path) -> tuple[int, int] | None:
    """(height, width) from project.json, when present."""
    path = folder / "project.json"
    if not path.is_file():
        return None
    try:
        project = json.loads(read_text(path))
        return int(project["image_height"]), int(project["image_width"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"cannot read image_width/image_height ({exc})", where=str(path)) from exc
