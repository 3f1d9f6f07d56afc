"""Reading images: sizes from headers, decoding to RGB, and the one resize/crop/flip transform.

Every sample, cached or not, goes through `transform_image` (principle "one way through"): the
latent cache encodes exactly what the uncached path would feed the VAE.

Decoding rules: the EXIF orientation is applied; palette, LA and RGBA images are composited on
white (the alpha is returned separately: with alpha_mask it becomes the loss mask, going through the
same resize, crop and flip as the pixels); CMYK, 16-bit, float and
grayscale images become 8-bit RGB. A file PIL cannot read raises `BadImage` with the reason, which
the callers turn into a warning (or an error under --strict). No torch here.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdtune.data.buckets import Size, cover_size, crop_box, random_offset, source_box

# EXIF orientations 5-8 rotate by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

# Decompression-bomb protection stays on, but scans and posters of up to ~400 MP are legitimate.
Image.MAX_IMAGE_PIXELS = 400_000_000

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}


class BadImage(Exception):
    """An image file that cannot be used; `reason` says why in a few words."""

    def __init__(self, path: Path | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _open(path: Path | str) -> Image.Image:
    try:
        if Path(path).stat().st_size == 0:
            raise BadImage(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except UnidentifiedImageError:
        raise BadImage(path, "not an image PIL can read") from None
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(path, f"unreadable ({exc})") from None


def read_size(path: Path | str) -> Size:
    """(width, height) as displayed (after EXIF rotation), from the file header only."""
    img = _open(path)
    try:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
            orientation = None
        if orientation in _SWAPPING_ORIENTATIONS:
            w, h = h, w
    finally:
        img.close()
    if w <= 0 or h <= 0:
        raise BadImage(path, f"reports an empty size {w}x{h}")
    return w, h


def _to_rgb(img: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """8-bit RGB plus the alpha channel (uint8) when the image had one."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit files store 0..65535; "I" may also hold 8-bit data (some PNG/TIFF readers).
        top = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        if img.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        alpha = np.asarray(img.getchannel("A"))
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img.convert("RGB"), mask=img.getchannel("A"))
        return white, alpha
    if img.mode != "RGB":
        img = img.convert("RGB")  # CMYK, YCbCr, L, 1, LAB, HSV
    return img, None


def load_image(path: Path | str) -> tuple[Image.Image, np.ndarray | None]:
    """The decoded, upright image as 8-bit RGB, and its alpha channel (or None)."""
    img = _open(path)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for truncated or broken data
        img.close()  # a failed load leaves the file open: one descriptor lost per bad image and epoch
        if isinstance(exc, BadImage):
            raise
        raise BadImage(path, f"cannot be decoded ({type(exc).__name__}: {exc})") from None


def transform_image(img: Image.Image, resized: Size, bucket: Size, *, crop_offset: tuple[int, int] | None = None,
                    flip: bool = False, interpolation: str | None = None) -> Image.Image:
    """Resize to cover the bucket, crop to it (centred or at `crop_offset`), optionally mirror.

    The crop is done inside the resize (PIL's `box`), which is the same picture as resizing the
    whole image and cropping, without resampling pixels that are thrown away. The filter is area
    averaging when shrinking and Lanczos when enlarging, unless `interpolation` names one.
    """
    box = crop_box(resized, bucket, crop_offset)
    src = source_box(img.size, resized, box)
    if interpolation:
        resample = FILTERS[interpolation]
    else:
        resample = Image.Resampling.BOX if resized[0] < img.size[0] else Image.Resampling.LANCZOS
    if resized == img.size and box == (0, 0, img.size[0], img.size[1]):
        out = img.copy()
    else:
        out = img.resize(bucket, resample=resample, box=src)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def color_augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' colour augmentation: with p=1/3, a hue shift of up to +-8/180 or a gamma in [0.95, 1.05]."""
    if rng.random() >= 1 / 3:
        return img
    if rng.random() < 0.5:
        hsv = np.asarray(img.convert("HSV")).copy()
        shift = rng.uniform(-8, 8) / 180 * 256
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(shift))) % 256).astype(np.uint8)
        return Image.fromarray(hsv, "HSV").convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return Image.fromarray(np.clip(arr ** gamma * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def to_array(img: Image.Image) -> np.ndarray:
    """(3, H, W) float32 in [-1, 1], the VAE's input range."""
    arr = np.asarray(img, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1) / 127.5 - 1.0)


def prepare(path: Path | str, size: Size, resized: Size, bucket: Size, *, flip: bool = False,
            crop_seed: int | None = None, color_seed: int | None = None, interpolation: str | None = None) -> np.ndarray:
    """Decode, transform and normalise one image: what the VAE sees for this sample.

    `size` and `resized` are the planned sizes. When the file's real size differs (a stale
    `image_size` in the metadata), the cover size is recomputed so the output is still the bucket.
    `crop_seed` given means a random crop drawn from it; `color_seed` given means colour augmentation.
    """
    return prepare_sample(path, size, resized, bucket, flip=flip, crop_seed=crop_seed, color_seed=color_seed,
                          interpolation=interpolation)[0]


def prepare_sample(path: Path | str, size: Size, resized: Size, bucket: Size, *, flip: bool = False,
                   crop_seed: int | None = None, color_seed: int | None = None, interpolation: str | None = None,
                   alpha_mask: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """`prepare`'s pixels and, with `alpha_mask`, the loss mask at latent size (else None)."""
    img, alpha = load_image(path)
    if img.size != tuple(size):
        resized = cover_size(img.size, bucket)
    offset = None
    if crop_seed is not None:
        offset = random_offset(resized, bucket, random.Random(crop_seed))
    out = transform_image(img, resized, bucket, crop_offset=offset, flip=flip, interpolation=interpolation)
    if color_seed is not None:
        out = color_augment(out, random.Random(color_seed))
    mask = None
    if alpha_mask:
        if alpha is None:  # no alpha channel: every pixel counts, as sd-scripts does
            mask = np.ones((bucket[1] // 8, bucket[0] // 8), dtype=np.float32)
        else:
            a = transform_image(Image.fromarray(alpha, "L"), resized, bucket, crop_offset=offset, flip=flip,
                                interpolation=interpolation)
            mask = latent_mask(np.asarray(a))
    return to_array(out), mask


def latent_mask(alpha: np.ndarray) -> np.ndarray:
    """The loss mask of a bucket-sized 8-bit alpha channel: alpha / 255 averaged over each 8x8 block,
    i.e. at the latents' size (what sd-scripts' area interpolation of the mask to the loss gives)."""
    h, w = alpha.shape
    a = alpha.astype(np.float32) / 255.0
    return np.ascontiguousarray(a.reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3), dtype=np.float32))
