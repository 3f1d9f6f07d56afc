"""The latent cache: each image encoded by the VAE once, reused until something it depends on changes.

Content-addressed. An entry's key is a SHA-256 over

    cache format version, the image's bytes (SHA-256), its size, bucket, cover size, crop box,
    flip, resize filter, the VAE's identity (SHA-256 of its weights), the encoding dtype and, for
    subsets with alpha_mask, that flag (such entries also hold the loss mask).

so a change re-encodes exactly the entries it touches, and the run says why ("image changed",
"bucket changed", "VAE changed", ...); an unchanged dataset is reused without a VAE call. Hashing
every image's bytes on every run would be slow, so `index.json` in each cache folder remembers
(file size, mtime) -> SHA-256: a file whose size and mtime are unchanged is not re-read.

Where: `<image folder>/.sdtune-cache/` by default, or `<cache_dir>/<hash of the image folder>/`.
An entry is `<image name>.<n|f>.<key[:16]>.safetensors` ("f" = the mirrored variant, made when
flip_aug is on) holding the VAE posterior `mean` and `logvar` (float16, shape (C, H/8, W/8)) and
its key's parts as metadata; with alpha_mask also `mask` (float32, (H/8, W/8), made from the alpha
channel by `images.prepare_sample` as on the uncached path). The trainer samples
`mean + exp(logvar / 2) * noise` afresh at every step and multiplies by `vae.config.scaling_factor`
(sd-scripts caches one frozen sample).

Entries are written atomically, one per image, so an interrupted run keeps everything it wrote and
the next run encodes only the rest. Unless --skip_cache_check, every entry's header (key, shapes,
dtype) is checked before it is trusted; a corrupt entry is re-encoded. Superseded entries of an
image (same name and variant, other key) are deleted once the new one is written.

A complete cache is read without writing, so it may live on read-only storage (the index is then not
updated: it only saves hashing). A cache that must be written and cannot be is refused with one line
pointing at --cache_dir before any image is encoded (`check_writable`).

`--cache_latents` without `--cache_latents_to_disk` keeps the entries in memory for this run only.
torch is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune.console import note, plural
from sdtune.data.buckets import crop_box
from sdtune.data.images import BadImage, prepare_sample
from sdtune.data.plan import DatasetPlan, Sample
from sdtune.data.writable import cache_refusal, write_problem
from sdtune.atomic import write_bytes
from sdtune.errors import UserError

FORMAT_VERSION = 1
CACHE_FOLDER = ".sdtune-cache"
# The key parts that explain a re-encode, in the order they are reported.
_REASONS = (("version", "cache format changed"), ("image", "image changed"), ("size", "image size changed"),
            ("bucket", "bucket changed"), ("resized", "resize changed"), ("crop", "crop changed"),
            ("interpolation", "resize filter changed"), ("vae", "VAE changed"), ("dtype", "dtype changed"),
            ("alpha_mask", "alpha mask changed"))


# ------------------------------------------------------------------------------------------------
# identities


def vae_identity(vae, dtype=None) -> str:
    """SHA-256 of the VAE's weights (names, shapes, dtypes and bytes), in a stable order.

    With `dtype`, of the weights as the encoder computes with them (floating tensors cast to
    `dtype`): a checkpoint stored in float16 and loaded in float32, or loaded in float32 and encoded
    in float16, then gives the same identity whichever command loaded it (`sdtune cache` keeps the
    file's precision; `sdtune train` loads float32), because the encoder sees the same numbers.
    """
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_folder(image: str | Path, cache_dir: str | Path | None) -> Path:
    image = Path(image)
    if cache_dir is None:
        return image.parent / CACHE_FOLDER
    tag = hashlib.sha256(str(image.parent.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{image.parent.name or 'root'}-{tag}"


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor dtypes, shapes, offsets, metadata) without torch."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 10_000_000:
            raise ValueError("header length is implausible")
        header = json.loads(fh.read(n))
        data_len = os.fstat(fh.fileno()).st_size - 8 - n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end != data_len:
        raise ValueError("truncated")
    return header


# ------------------------------------------------------------------------------------------------
# the index: (size, mtime) -> sha256, so unchanged images are not re-read


class _FileHashes:
    def __init__(self, rank: int, world_size: int):
        self.suffix = "index.json" if world_size == 1 else f"index-rank{rank}.json"
        self.known: dict[Path, dict[str, dict]] = {}
        self.dirty: set[Path] = set()

    def _folder(self, folder: Path) -> dict[str, dict]:
        if folder not in self.known:
            merged: dict[str, dict] = {}
            for f in sorted(folder.glob("index*.json")) if folder.is_dir() else []:
                try:
                    merged.update(json.loads(f.read_text()))
                except (OSError, ValueError):
                    pass  # an unreadable index only costs re-hashing
            self.known[folder] = merged
        return self.known[folder]

    def sha256(self, image: str, folder: Path) -> str:
        st = os.stat(image)
        table = self._folder(folder)
        rec = table.get(Path(image).name)
        if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            return rec["sha256"]
        digest = _sha256_file(image)
        table[Path(image).name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty.add(folder)
        return digest

    def flush(self) -> None:
        for folder in list(self.dirty):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                write_bytes(folder / self.suffix, json.dumps(self.known[folder], indent=0, sort_keys=True).encode())
            except OSError:
                pass  # a read-only cache (complete, or refused before encoding) only costs re-hashing next time
        self.dirty.clear()


def check_writable(todo: list["Entry"]) -> None:
    """Before any encoding: every folder that will receive a new entry can be written (a complete
    cache is never tried, so it may be read-only)."""
    counts = Counter(e.path.parent for e in todo if e.path is not None)
    for folder, n in counts.items():
        problem = write_problem(folder)
        if problem:
            raise cache_refusal(folder, problem, "the latent cache", f"{n} entr{'y' if n == 1 else 'ies'} must be encoded")


# ------------------------------------------------------------------------------------------------
# what the run needs


@dataclass
class Entry:
    sample: int
    flip: bool
    parts: dict[str, Any]
    key: str
    path: Path | None  # None for in-memory entries
    reason: str = ""
    old: list[Path] = field(default_factory=list)


@dataclass
class LatentCache:
    """Where each sample's latents are: `paths[(index, flip)]` on disk or `memory[(index, flip)]`.

    `plan` is the input plan without the images that failed to decode.
    """

    plan: DatasetPlan
    paths: dict[tuple[int, bool], str] = field(default_factory=dict)
    memory: dict[tuple[int, bool], tuple[Any, Any]] = field(default_factory=dict)
    masks: dict[tuple[int, bool], Any] = field(default_factory=dict)  # in-memory loss masks (alpha_mask)
    reused: int = 0
    encoded: int = 0
    reasons: Counter = field(default_factory=Counter)
    dtype: str = ""  # the precision the VAE encodes (and encoded) the entries in, e.g. "float32"
    failures: dict[int, str] = field(default_factory=dict)  # sample index -> why its image was left out

    def has(self, index: int, flip: bool) -> bool:
        return (index, flip) in self.paths or (index, flip) in self.memory

    def share(self) -> dict[str, Any]:
        """What one process of a sharded encoding found, small enough to send to the others."""
        return {"paths": self.paths, "failures": self.failures, "reused": self.reused, "encoded": self.encoded}

    @staticmethod
    def shares_visible(shares: list[dict[str, Any]]) -> bool:
        """Whether this process sees the entries the others wrote (storage every machine shares), judged
        by one entry of each share; on machine-local copies of the cache it does not."""
        return all(os.path.exists(next(iter(share["paths"].values()))) for share in shares if share["paths"])

    @classmethod
    def from_shares(cls, plan: DatasetPlan, shares: list[dict[str, Any]], dtype: str) -> LatentCache:
        """The whole cache from every process's `share()`: no process reads another's entries."""
        cache = cls(plan, dtype=dtype)
        for share in shares:
            cache.paths.update(share["paths"])
            cache.failures.update(share["failures"])
            cache.reused += share["reused"]
            cache.encoded += share["encoded"]
        if cache.failures:
            cache.plan = plan.without(cache.failures)
        return cache


def _parts(plan: DatasetPlan, s: Sample, flip: bool, image_sha: str, vae_id: str, dtype: str) -> dict[str, Any]:
    parts = {"version": FORMAT_VERSION, "image": image_sha, "size": list(s.size), "bucket": list(s.bucket),
             "resized": list(s.resized), "crop": list(crop_box(s.resized, s.bucket)), "flip": flip,
             "interpolation": plan.subsets[s.subset].resize_interpolation, "vae": vae_id, "dtype": dtype}
    if plan.subsets[s.subset].alpha_mask:  # only then: the keys of entries without a mask stay as they were
        parts["alpha_mask"] = True
    return parts


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _why(prefix_matches: list[Path], parts: dict[str, Any]) -> str:
    """Compare with an older entry of the same image to say what changed."""
    for old in prefix_matches:
        try:
            meta = json.loads(read_header(old).get("__metadata__", {}).get("sdtune_cache", "{}"))
        except (OSError, ValueError):
            continue
        changed = [text for k, text in _REASONS if meta.get(k) != parts.get(k)]
        if changed:
            return changed[0]
    return "not cached yet"


def _valid(path: Path, key: str, bucket: tuple[int, int], mask: bool = False) -> bool:
    try:
        header = read_header(path)
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__", {})
    if meta.get("sdtune_key") != key:
        return False
    shape = [bucket[1] // 8, bucket[0] // 8]
    for name in ("mean", "logvar"):
        info = header.get(name)
        if not info or info.get("dtype") != "F16" or len(info["shape"]) != 3 or info["shape"][1:] != shape:
            return False
    if mask and (header.get("mask") or {}).get("shape") != shape:
        return False
    return header["mean"]["shape"] == header["logvar"]["shape"]


def _plan_entries(plan: DatasetPlan, vae_id: str, dtype: str, to_disk: bool, hashes: _FileHashes,
                  rank: int, world_size: int, check: bool) -> tuple[list[Entry], list[Entry], dict[int, str]]:
    """(reusable, to encode, failures) for this rank's share of the entries."""
    opts = plan.loading
    wanted = [(s, flip) for s in plan.active for flip in ((False, True) if plan.subsets[s.subset].flip_aug else (False,))]
    wanted.sort(key=lambda e: (e[0].bucket, e[0].path, e[1]))
    mine = wanted[rank::world_size]
    reuse, todo, failures = [], [], {}
    listing = _Listing()
    from tqdm import tqdm

    for s, flip in tqdm(mine, desc="checking latent cache", unit="img", leave=False, disable=None):
        if not to_disk:  # nothing to compare with: the image is not hashed
            parts = _parts(plan, s, flip, "", vae_id, dtype)
            todo.append(Entry(s.index, flip, parts, _key(parts), None, "in-memory cache"))
            continue
        folder = cache_folder(s.path, opts.cache_dir)
        try:
            sha = hashes.sha256(s.path, folder)
        except OSError as exc:
            failures[s.index] = f"unreadable ({exc.strerror or exc})"
            continue
        parts = _parts(plan, s, flip, sha, vae_id, dtype)
        key = _key(parts)
        name = Path(s.path).name
        variant = "f" if flip else "n"
        path = folder / f"{name}.{variant}.{key[:16]}.safetensors"
        others = [folder / n for n in listing.entries(folder, f"{name}.{variant}.") if folder / n != path]
        if path.name in listing.names(folder):
            if not check or _valid(path, key, s.bucket, "alpha_mask" in parts):
                reuse.append(Entry(s.index, flip, parts, key, path, old=others))
                continue
            todo.append(Entry(s.index, flip, parts, key, path, "corrupt entry", others))
            continue
        todo.append(Entry(s.index, flip, parts, key, path, _why(others, parts), others))
    return reuse, todo, failures


class _Listing:
    """Each cache folder listed once: a glob or a file-status call per image would read a folder of
    N entries N times (hours for a million images on shared storage)."""

    def __init__(self) -> None:
        self._names: dict[Path, set[str]] = {}
        self._by_image: dict[Path, dict[str, list[str]]] = {}

    def names(self, folder: Path) -> set[str]:
        if folder not in self._names:
            try:
                self._names[folder] = {n for n in os.listdir(folder) if n.endswith(".safetensors")}
            except OSError:  # not made yet: no entries
                self._names[folder] = set()
        return self._names[folder]

    def entries(self, folder: Path, prefix: str) -> list[str]:
        """The entry files of one image and variant: `<image name>.<n|f>.<key>.safetensors`."""
        if folder not in self._by_image:
            table: dict[str, list[str]] = {}
            for n in self.names(folder):
                head = n[:-len(".safetensors")].rsplit(".", 1)[0]  # without the key
                table.setdefault(head + ".", []).append(n)
            self._by_image[folder] = table
        return sorted(self._by_image[folder].get(prefix, []))


# ------------------------------------------------------------------------------------------------
# encoding


def ensure_latent_cache(plan: DatasetPlan, vae, *, device="cpu", dtype=None, to_disk: bool | None = None,
                        batch_size: int | None = None, workers: int | None = None, rank: int = 0, world_size: int = 1,
                        log=None, progress: bool = True) -> LatentCache:
    """Make sure every (sample, flip) of `plan` has latents; encode only what is missing or stale.

    `dtype` defaults to float16 on CUDA and float32 elsewhere (float32 with `--no_half_vae`). With
    several processes each rank encodes its share (call it on every rank, then wait for all).
    Images that fail to decode are skipped with a warning (an error under --strict) and left out of
    the returned `cache.plan`.
    """
    import torch

    opts = plan.loading
    log = log or note
    to_disk = opts.cache_latents_to_disk if to_disk is None else to_disk
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" and not opts.no_half_vae else torch.float32
    if opts.no_half_vae:
        dtype = torch.float32
    batch_size = batch_size or opts.vae_batch_size
    workers = opts.max_data_loader_n_workers if workers is None else workers
    dtype_name = str(dtype).removeprefix("torch.")

    vae_id = vae_identity(vae, dtype)
    hashes = _FileHashes(rank, world_size)
    reuse, todo, failures = _plan_entries(plan, vae_id, dtype_name, to_disk, hashes, rank, world_size,
                                          check=not opts.skip_cache_check)
    hashes.flush()
    cache = LatentCache(plan, dtype=dtype_name)
    for e in reuse:
        cache.paths[(e.sample, e.flip)] = str(e.path)
        _delete(e.old)
    cache.reused = len(reuse)
    if todo:
        cache.reasons = Counter(e.reason for e in todo)
        why = ", ".join(f"{n} {r}" for r, n in cache.reasons.most_common())
        log(f"latent cache: reusing {plural(len(reuse), 'entry')}, encoding {len(todo)} ({why})")
        check_writable(todo)
        _encode(plan, vae, todo, cache, failures, device=device, dtype=dtype, batch_size=batch_size,
                workers=workers, log=log, progress=progress)
    else:
        log(f"latent cache: all {plural(len(reuse), 'entry')} up to date, no VAE call needed")
    if failures:
        if opts.strict:
            i, reason = next(iter(failures.items()))
            raise UserError(f"bad image: {reason}", where=plan.samples[i].path,
                            fix="Fix or remove it, or drop --strict to skip it.")
        for i, reason in failures.items():
            log(f"warning: {plan.samples[i].path}: {reason}; skipped")
        cache.plan = plan.without(failures)
    cache.failures = failures
    return cache


def _delete(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass  # another rank or run removed it, or it is read-only: harmless


def _encoder(vae, device, dtype):
    """The VAE on `device` in `dtype`, without changing the caller's copy's precision."""
    import copy

    import torch

    param = next(vae.parameters())
    if param.dtype != dtype:
        return copy.deepcopy(vae).to(device=device, dtype=dtype).eval(), None
    original = param.device
    return vae.to(device).eval(), (original if original != torch.device(device) else None)


def _encode(plan, vae, todo: list[Entry], cache: LatentCache, failures: dict[int, str], *, device, dtype,
            batch_size, workers, log, progress) -> None:
    from tqdm import tqdm

    def decode(e: Entry):
        s = plan.samples[e.sample]
        try:
            return prepare_sample(s.path, s.size, s.resized, s.bucket, flip=e.flip,
                                  interpolation=plan.subsets[s.subset].resize_interpolation,
                                  alpha_mask="alpha_mask" in e.parts)
        except BadImage as exc:
            return exc

    encoder, restore = _encoder(vae, device, dtype)
    bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not progress or None, smoothing=0.1)
    pool = ThreadPoolExecutor(max_workers=max(1, workers)) if workers > 0 else None
    window: deque = deque()
    pending: list[tuple[Entry, Any]] = []
    written = 0
    it = iter(todo)

    def fill():
        while len(window) < max(2 * batch_size, 4 * max(1, workers)):
            e = next(it, None)
            if e is None:
                return
            window.append((e, pool.submit(decode, e) if pool else None))

    try:
        fill()
        while window:
            e, fut = window.popleft()
            fill()
            arr = fut.result() if fut is not None else decode(e)
            if isinstance(arr, BadImage):
                failures[e.sample] = arr.reason
                bar.update(1)
                continue
            if pending and (pending[0][1][0].shape != arr[0].shape or len(pending) >= batch_size):
                written += _encode_batch(encoder, pending, cache, device, dtype)
                bar.update(len(pending))
                pending = []
            pending.append((e, arr))
        if pending:
            written += _encode_batch(encoder, pending, cache, device, dtype)
            bar.update(len(pending))
    finally:
        bar.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        if restore is not None:
            vae.to(restore)
    cache.encoded = written
    # A sample whose flipped variant failed cannot train either.
    for e in todo:
        if e.sample in failures:
            cache.paths.pop((e.sample, e.flip), None)
            cache.memory.pop((e.sample, e.flip), None)


def _encode_batch(encoder, items: list[tuple[Entry, Any]], cache: LatentCache, device, dtype) -> int:
    import numpy as np
    import torch

    x = torch.from_numpy(np.stack([a for _e, (a, _m) in items])).to(device=device, dtype=dtype)
    with torch.no_grad():
        dist = encoder.encode(x).latent_dist
        mean, logvar = dist.mean.float(), dist.logvar.float()
    if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
        hint = "Run the VAE in float32 with --no_half_vae." if dtype == torch.float16 else "Check the VAE weights."
        raise UserError("the VAE produced NaN/inf latents", where=f"sample {items[0][0].sample}", fix=hint)
    mean, logvar = mean.to("cpu", torch.float16), logvar.to("cpu", torch.float16)
    for k, (e, (_a, mask)) in enumerate(items):
        m, lv = mean[k].clone(), logvar[k].clone()
        mask = torch.from_numpy(mask) if mask is not None else None
        if e.path is None:
            cache.memory[(e.sample, e.flip)] = (m, lv)
            if mask is not None:
                cache.masks[(e.sample, e.flip)] = mask
            continue
        _write_entry(e, m, lv, mask)
        cache.paths[(e.sample, e.flip)] = str(e.path)
        _delete(e.old)
    return len(items)


def _write_entry(e: Entry, mean, logvar, mask=None) -> None:
    from safetensors.torch import save

    meta = {"sdtune_key": e.key, "sdtune_cache": json.dumps(e.parts, sort_keys=True), "format": "pt"}
    tensors = {"mean": mean.contiguous(), "logvar": logvar.contiguous()}
    if mask is not None:
        tensors["mask"] = mask.contiguous()
    try:
        e.path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(e.path, save(tensors, metadata=meta))
    except OSError as exc:  # a disk filled up or went read-only during the run; the entries written are kept
        raise cache_refusal(e.path.parent, exc.strerror or str(exc), "the latent cache", "") from None


def load_entry(path: str, bucket: tuple[int, int]):
    """(mean, logvar) float16 tensors of one entry, shape-checked against the bucket."""
    return load_entry_with_mask(path, bucket)[:2]


def load_entry_with_mask(path: str, bucket: tuple[int, int]):
    """`load_entry` plus the entry's float32 loss mask (None when it has none)."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    mean, logvar, mask = tensors.get("mean"), tensors.get("logvar"), tensors.get("mask")
    expected = (bucket[1] // 8, bucket[0] // 8)
    if mean is None or logvar is None or tuple(mean.shape[1:]) != expected or mean.shape != logvar.shape or \
            (mask is not None and tuple(mask.shape) != expected):
        raise ValueError(f"latent cache entry does not match bucket {bucket[0]}x{bucket[1]}")
    return mean, logvar, mask


def sample_latents(mean, logvar, generator=None):
    """A fresh draw from the cached posterior, as diffusers' DiagonalGaussianDistribution.sample.

    Multiply the result by `vae.config.scaling_factor` before adding noise.
    """
    import torch

    logvar = torch.clamp(logvar.float(), -30.0, 20.0)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return mean.float() + torch.exp(0.5 * logvar) * noise


def cache_plan_summary(plan: DatasetPlan) -> str:
    """What caching would do, for --dry_run: entries needed and files already present (no VAE, no torch)."""
    opts = plan.loading
    if not opts.caches_latents:
        return "latent cache: off (the VAE encodes each batch during training)"
    entries = sum(2 if plan.subsets[s.subset].flip_aug else 1 for s in plan.active)
    if not opts.cache_latents_to_disk:
        return f"latent cache: in memory, {plural(entries, 'entry')} encoded at the start of the run"
    folders: dict[Path, int] = Counter(cache_folder(s.path, opts.cache_dir) for s in plan.active)
    present = 0
    for folder in folders:
        if folder.is_dir():
            present += sum(1 for _ in folder.glob("*.safetensors"))
    return (f"latent cache: on disk in {plural(len(folders), 'folder')} (e.g. {next(iter(folders))}), "
            f"{plural(entries, 'entry')} needed, {plural(present, 'entry file')} present; they are checked against "
            "the image contents and the VAE when the run starts")
