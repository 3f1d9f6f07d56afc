"""Files shared by the preparation commands: image discovery, image loading, metadata I/O.

Kept in one module so it can later be merged with the dataset module's own helpers
(src/sdtune/data/). Nothing here imports torch.

Metadata formats (those sd-scripts' fine-tuning dataset reads):
  * JSON  (`*.json`):  {key: {"caption"?, "tags"?, "image_size"?: [w, h], ...}, ...}
  * JSONL (`*.jsonl`): one {"image_path": key, "caption"?, "tags"?, "image_size"?} per line.
Both are read into the same {key: record} dict (insertion order kept) and written back in the
format the file name asks for. Writes are atomic (temp file + os.replace); when an existing file
is replaced, its previous content is kept next to it as `<name>.bak`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

# IMAGE_EXTENSIONS: sd-scripts' list, matched case-insensitively; shared with training.
from sdtune.data.images import IMAGE_EXTENSIONS
from sdtune.errors import UserError
from sdtune.umask import give_default_mode


def find_images(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Images under `directory` (sorted, unique); a missing folder or no images is a UserError."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError("image folder not found", where=str(root),
                        fix="Pass the folder that holds the training images.")
    walker = root.rglob("*") if recursive else root.glob("*")
    images = sorted({p for p in walker if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()})
    if not images:
        hint = "" if recursive else " Add --recursive to search subfolders."
        raise UserError(f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, any case)", where=str(root),
                        fix=f"Check the folder.{hint}")
    return images


def sidecar(image: Path, extension: str) -> Path:
    """`img.png` + ".caption" -> `img.caption` (sd-scripts: the image's stem plus the extension)."""
    return image.with_name(image.stem + extension)


def normalize_extension(extension: str, option: str = "--caption_extension") -> str:
    if not extension or extension in (".",) or "/" in extension or os.sep in extension:
        raise UserError(f"invalid file extension {extension!r}", where=option, fix='Use something like ".txt".')
    return extension if extension.startswith(".") else "." + extension


def load_image(path: Path):
    """Open an image fully (so decoding errors surface here); returns a PIL image or None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            # copy(): closing the file invalidates the lazily loaded original.
            return img.copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None


def to_8bit(img):
    """16-bit and 32-bit integer greyscale images scaled to 8-bit "L".

    PIL's own conversion of "I;16"/"I" to RGB clips at 255 instead of scaling, which turns most
    16-bit PNGs white.
    """
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "L")
    return img


def has_alpha(img) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def flatten_on_white(img):
    """Composite any transparency onto white; everything else becomes RGB."""
    from PIL import Image

    img = to_8bit(img)
    if has_alpha(img):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def prefetch_batches(items: list, work: Callable, batch_size: int, num_workers: int) -> Iterator[list]:
    """`[work(x) for x in batch]` per batch, in order; with workers, computed in threads (PIL releases
    the GIL while decoding and resizing) at most a few batches ahead, so memory stays flat."""
    if num_workers <= 0:
        for start in range(0, len(items), batch_size):
            yield [work(x) for x in items[start:start + batch_size]]
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    ahead = max(2 * batch_size, 2 * num_workers)
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        pending: deque = deque(pool.submit(work, x) for x in items[:ahead])
        rest = iter(items[ahead:])
        batch = []
        while pending:
            batch.append(pending.popleft().result())
            nxt = next(rest, None)
            if nxt is not None:
                pending.append(pool.submit(work, nxt))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


# ---------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_text(path: str | Path, text: str, backup: bool = False) -> Path | None:
    """Write `text` to `path` via a temp file in the same folder; returns the backup path if made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backup_path = None
    if backup and path.exists():
        backup_path = path.with_name(path.name + ".bak")
        shutil.copy2(path, backup_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        give_default_mode(tmp)  # mkstemp makes it owner-only
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return backup_path


def read_text(path: Path) -> str:
    """A caption/tag file's text (UTF-8, BOM tolerated), or a UserError naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", where=str(path),
                        fix="Re-save the file as UTF-8.") from exc


# ---------------------------------------------------------------------------------------------
# metadata


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


def check_metadata_name(path: str | Path, option: str) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise UserError("metadata file must end in .json or .jsonl", where=f"{option} {path}",
                        fix="Name it e.g. meta_cap.json (or .jsonl for one record per line).")
    return path


def read_metadata(path: str | Path) -> dict[str, dict]:
    """Read a JSON or JSONL metadata file into {key: record} (JSONL records lose their image_path,
    which is the key). The training side's reader, so both sides accept exactly the same files."""
    from sdtune.data.metadata import read_metadata as read

    return {key: {k: v for k, v in record.items() if k != "image_path"} for key, record in read(path).items()}


def write_metadata(path: str | Path, meta: dict[str, dict]) -> Path | None:
    """Write {key: record} as JSON or JSONL (by suffix), atomically; returns the backup path if any."""
    path = Path(path)
    if is_jsonl(path):
        text = "".join(json.dumps({"image_path": k, **v}, ensure_ascii=False) + "\n" for k, v in meta.items())
    else:
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text, backup=True)


def image_key(image: Path, full_path: bool) -> str:
    """sd-scripts' metadata key: the path as found with --full_path, else the file stem."""
    return str(image) if full_path else image.stem


def check_unique_keys(images: Iterable[Path], full_path: bool) -> None:
    """Stem keys must not collide (a.png and a.jpg would overwrite each other's record)."""
    if full_path:
        return
    seen: dict[str, Path] = {}
    for image in images:
        other = seen.setdefault(image.stem, image)
        if other is not image:
            raise UserError(f"two images share the key {image.stem!r}: {other.name} and {image.name}",
                            where=str(image.parent), fix="Rename one of them, or use --full_path.")
