"""SmilingWolf WD taggers (wd-v1-4-*-v2 and wd-*-v3): labels, preprocessing, model location.

Preprocessing follows the model author's reference (HF space SmilingWolf/wd-tagger): alpha
composited onto white, padded to a centred white square (odd extra pixel right/bottom), resized to
the model's input size with PIL bicubic, float32 in 0..255, RGB flipped to BGR, NHWC. The mean/std
normalisation is inside the graph. sd-scripts resizes with OpenCV INTER_AREA when shrinking; we
follow the model author and need no OpenCV.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sdtune.errors import UserError
from sdtune.prep.files import flatten_on_white
from sdtune.prep.hub import download, looks_like_repo_id
from sdtune.prep.tags import CATEGORY_NAMES

DEFAULT_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
FILES = ["model.onnx", "selected_tags.csv"]


def preprocess(img, height: int, width: int) -> np.ndarray:
    """A PIL image -> float32 [height, width, 3], BGR, 0..255."""
    from PIL import Image

    rgb = flatten_on_white(img)
    w, h = rgb.size
    side = max(w, h)
    if w != h:
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(rgb, ((side - w) // 2, (side - h) // 2))
        rgb = square
    if (side, side) != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.float32)[:, :, ::-1].copy()


def load_labels(csv_path: Path) -> list[tuple[str, int]]:
    """(name, category) per model output, in output order, from selected_tags.csv."""
    if not csv_path.is_file():
        raise UserError("label file not found", where=str(csv_path),
                        fix="A WD tagger folder holds model.onnx and selected_tags.csv.")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"name", "category"} <= set(reader.fieldnames):
            raise UserError(f"expected columns tag_id,name,category,count, got {reader.fieldnames}",
                            where=str(csv_path))
        labels = []
        for lineno, row in enumerate(reader, 2):
            try:
                category = int(row["category"])
            except (TypeError, ValueError) as exc:
                raise UserError(f"category {row['category']!r} is not a number", where=f"{csv_path}:{lineno}") from exc
            if category not in CATEGORY_NAMES:
                raise UserError(f"unknown category {category} for tag {row['name']!r}", where=f"{csv_path}:{lineno}",
                                fix="WD taggers use 9 (rating), 0 (general) and 4 (character).")
            labels.append((row["name"], category))
    if not labels:
        raise UserError("no labels", where=str(csv_path))
    return labels


def is_wd14_folder(folder: Path) -> bool:
    return (folder / "selected_tags.csv").is_file()


def locate(repo_id: str, model_dir: str | None, force_download: bool) -> Path:
    """The folder with model.onnx and selected_tags.csv.

    `repo_id` may be a local folder. Otherwise `model_dir` is used when it already holds the files
    (directly, or in sd-scripts' `<model_dir>/<owner>_<name>` subfolder); if not, the files are
    downloaded there, or into the hub cache when no --model_dir is given.
    """
    local = Path(repo_id).expanduser()
    if local.is_dir():
        return _check_folder(local)
    if model_dir and not force_download:
        for candidate in (Path(model_dir), Path(model_dir) / repo_id.replace("/", "_")):
            if (candidate / FILES[0]).is_file():
                return _check_folder(candidate)
    if repo_id.count("/") == 2:
        raise UserError("tag_mapping.json models (owner/name/subdir repositories) are not supported",
                        where=f"--repo_id {repo_id}", fix="Use a SmilingWolf WD tagger (model.onnx + selected_tags.csv).")
    if not looks_like_repo_id(repo_id):
        raise UserError("neither a folder nor a hub repository id (owner/name)", where=f"--repo_id {repo_id}")
    target = Path(model_dir) / repo_id.replace("/", "_") if model_dir else None
    return _check_folder(download(repo_id, FILES, local_dir=target, force=force_download, option="--repo_id"))


def _check_folder(folder: Path) -> Path:
    if not (folder / "model.onnx").is_file():
        hint = ("This looks like a Keras SavedModel; sdtune runs the ONNX export (model.onnx, in the same "
                "hub repository)." if (folder / "saved_model.pb").is_file() else
                "A WD tagger folder holds model.onnx and selected_tags.csv.")
        raise UserError("no model.onnx", where=str(folder), fix=hint)
    if not (folder / "selected_tags.csv").is_file():
        raise UserError("no selected_tags.csv", where=str(folder), fix="Copy it from the model's hub repository.")
    return folder
