"""`tag_images`: run a WD14 or DeepDanbooru ONNX tagger over a folder of images.

Images are decoded and preprocessed in worker threads (PIL releases the GIL), at most a few
batches ahead so memory stays flat on large folders, and the model runs batch by batch on the
main thread. Output goes to `<stem><caption_extension>` next to each image, or into one
metadata file with `output_path`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sdtune.console import plural
from sdtune.errors import UserError
from sdtune.prep import deepdanbooru, wd14
from sdtune.atomic import atomic_write_text
from sdtune.metadata import check_metadata_name, read_metadata, write_metadata
from sdtune.prep.files import find_images, load_image, normalize_extension, prefetch_batches, read_text, sidecar
from sdtune.prep.onnx_model import OnnxImageModel, load_onnx_model
from sdtune.prep.tags import RATING, Label, TagOptions, merge_with_existing, prepare_labels, select_tags


@dataclass
class Tagger:
    kind: str  # "wd14" or "deepdanbooru"
    folder: Path
    model: OnnxImageModel
    labels: list[Label]
    height: int
    width: int
    preprocess: Callable


@dataclass
class TagResult:
    written: list[Path] = field(default_factory=list)
    skipped_existing: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)
    frequencies: Counter = field(default_factory=Counter)


def load_tagger(model: str = wd14.DEFAULT_REPO, *, kind: str = "auto", model_dir: str | None = None,
                force_download: bool = False, options: TagOptions = TagOptions(),
                providers: list[str] | None = None) -> Tagger:
    """Find, load and check a tagger. `model` is a folder or a hub id (WD14 only)."""
    if kind not in ("auto", "wd14", "deepdanbooru"):
        raise UserError(f"unknown tagger {kind!r}", where="--tagger", fix="Use auto, wd14 or deepdanbooru.")
    local = Path(model).expanduser()
    if kind == "auto":
        kind = "deepdanbooru" if local.is_dir() and deepdanbooru.is_dd_folder(local) and not wd14.is_wd14_folder(local) \
            else "wd14"
    if kind == "deepdanbooru":
        if not local.is_dir():
            raise UserError("DeepDanbooru needs a local project folder", where=str(model),
                            fix="Pass the folder with tags.txt and the .onnx model.")
        folder, raw = local, deepdanbooru.load_labels(local)
        onnx = load_onnx_model(deepdanbooru.model_file(local), providers)
        fallback = deepdanbooru.project_size(local)
        prep = deepdanbooru.preprocess
    else:
        folder = wd14.locate(model, model_dir, force_download)
        raw = wd14.load_labels(folder / "selected_tags.csv")
        onnx = load_onnx_model(folder / "model.onnx", providers)
        fallback = None
        prep = wd14.preprocess
    height, width = onnx.height, onnx.width
    if height is None or width is None:
        if fallback is None:
            raise UserError("the model's input size is not fixed and no project.json gives it", where=str(onnx.path))
        height, width = fallback
    if onnx.outputs is not None and onnx.outputs != len(raw):
        raise UserError(f"the model has {plural(onnx.outputs, 'output')} but the label file lists "
                        f"{plural(len(raw), 'tag')}",
                        where=str(folder), fix="The label file belongs to another model; use the one shipped with it.")
    if options.rating != "none" and not any(cat == RATING for _, cat in raw):
        raise UserError("this model has no rating labels", where="--use_rating_tags")
    labels, unmatched = prepare_labels(raw, options)
    if unmatched:
        print(f"warning: --tag_replacement: no tag named {', '.join(map(repr, unmatched))} in this model")
    return Tagger(kind, folder, onnx, labels, height, width, prep)


def tag_images(image_dir: str | Path, tagger: Tagger, *, options: TagOptions = TagOptions(),
               caption_extension: str = ".txt", output_path: str | Path | None = None, recursive: bool = False,
               batch_size: int = 1, num_workers: int = 0, overwrite: bool = False, append_tags: bool = False,
               progress: bool = True) -> TagResult:
    """Tag every image under `image_dir`; images that already have tags are skipped unless `overwrite`.

    With `append_tags` the existing tag file is extended (its tags first), so nothing is skipped.
    With `output_path` (.json or .jsonl) the tags go to that metadata file under "tags", keyed by
    image path as found, with "image_size"; an existing file is updated (previous copy kept as .bak).
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}", where="--batch_size")
    if num_workers < 0:
        raise UserError("must be 0 or more", where="--max_data_loader_n_workers")
    if tagger.model.batch is not None and batch_size != tagger.model.batch:
        print(f"note: the model has a fixed batch size of {tagger.model.batch}; running it in chunks of "
              f"{tagger.model.batch}")
    caption_extension = normalize_extension(caption_extension)
    images = find_images(image_dir, recursive)
    result = TagResult()
    meta = None
    if output_path is not None:
        output_path = check_metadata_name(output_path, "--output_path")
        meta = read_metadata(output_path) if Path(output_path).exists() else {}

    def already_done(image: Path) -> bool:
        if overwrite or append_tags:
            return False
        if meta is not None:
            return "tags" in meta.get(str(image), {})
        return sidecar(image, caption_extension).exists()

    todo = []
    for image in images:
        (result.skipped_existing if already_done(image) else todo).append(image)

    sep = options.caption_separator
    bar = tqdm(total=len(todo), unit="img", desc="tagging", disable=not progress or not todo, dynamic_ncols=True)
    try:
        for batch in _batches(todo, tagger, batch_size, num_workers):
            ok = [(p, arr, size) for p, arr, size in batch if arr is not None]
            result.unreadable += [p for p, arr, _ in batch if arr is None]
            if ok:
                probs = tagger.model.run(np.stack([arr for _, arr, _ in ok]))
                if probs.shape[1] != len(tagger.labels):
                    raise UserError(f"the model returned {probs.shape[1]} scores for {len(tagger.labels)} labels",
                                    where=str(tagger.folder), fix="Use the label file shipped with the model.")
                for (image, _, size), p in zip(ok, probs):
                    tags = select_tags(p, tagger.labels, options)
                    if meta is not None:
                        record = meta.setdefault(str(image), {})
                        if append_tags and record.get("tags"):
                            tags = merge_with_existing(record["tags"], tags, sep)
                        record["tags"] = sep.join(tags)
                        record["image_size"] = list(size)
                    else:
                        target = sidecar(image, caption_extension)
                        if append_tags and target.exists():
                            tags = merge_with_existing(read_text(target), tags, sep)
                        atomic_write_text(target, sep.join(tags) + "\n")
                    result.frequencies.update(tags)
                    result.written.append(image)
            bar.update(len(batch))
    finally:
        bar.close()
        # Write what was done even when interrupted, so a re-run skips it.
        if meta is not None and result.written:
            write_metadata(output_path, meta)
    return result


def _batches(images: list[Path], tagger: Tagger, batch_size: int, num_workers: int) -> Iterator[list]:
    def work(path: Path):
        img = load_image(path)
        if img is None:
            return path, None, None
        try:
            return path, tagger.preprocess(img, tagger.height, tagger.width), img.size
        except (OSError, ValueError):  # truncated data can surface only on conversion
            return path, None, None

    return prefetch_batches(images, work, batch_size, num_workers)


def format_frequencies(freq: Counter) -> str:
    lines = [f"{count:6d}  {tag}" for tag, count in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "tag frequencies:\n" + "\n".join(lines)
