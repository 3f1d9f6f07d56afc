"""The fast paths that let a million-image dataset plan in seconds give the same answers as the
plain rules they replace: key resolution over folder listings vs `resolve_key` (file-status calls),
the binary-searched bucket vs `select_bucket` (a scan), and slotted samples still pickle (loader
workers started with spawn receive the plan)."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

from sdtune.data.buckets import BucketRule, select_bucket
from sdtune.data.metadata import _Listings, load_records
from sdtune.data.plan import Sample
from sdtune.metadata import resolve_key


def test_listed_keys_resolve_exactly_as_resolve_key(tmp_path, monkeypatch):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "b.JPG", "c.webp", "sub/d.jpeg", "e.png", "e.jpg", "f.PnG", "g.txt", "h"):
        (images / name).write_bytes(b"")
    (tmp_path / "e.png").write_bytes(b"")  # as it stands (cwd) wins over the image folder for full names
    (tmp_path / "k.png").write_bytes(b"")  # a stem found only from the working directory
    os.symlink(images / "a.png", images / "link.png")
    monkeypatch.chdir(tmp_path)
    keys = ["a", "a.png", "b", "b.JPG", "c", "sub/d", "sub/d.jpeg", "sub//d", "./sub/d", "e", "e.png", "f", "f.PnG",
            "g.txt", "h", "k", "missing", "sub/missing", str(images / "c"), str(images / "c.webp"), "link", "~nobody"]
    listings = _Listings()
    for root in (str(images), None):
        for key in keys:
            want = resolve_key(key, None if root is None else Path(root))
            got = listings.resolve(key, root)
            assert got == (None if want is None else str(want)), (key, root)


def test_load_records_finds_every_key_of_a_flat_folder(tmp_path):
    import json

    images = tmp_path / "images"
    images.mkdir()
    names = [f"img_{i:04d}" for i in range(300)]
    for i, name in enumerate(names):
        (images / f"{name}{('.png', '.jpg', '.WEBP')[i % 3]}").write_bytes(b"")
    (tmp_path / "meta.json").write_text(json.dumps({n: {"caption": n, "image_size": [64, 96]} for n in names}))
    records = load_records(tmp_path / "meta.json", images)
    assert [r.path for r in records] == [resolve_key(n, images) for n in names]
    assert records[0].image_size == (64, 96) and records[0].caption == "img_0000"


def test_binary_searched_bucket_is_the_scanned_one():
    rng = random.Random(0)
    for resolution, step in (((512, 512), 64), ((1024, 1024), 64), ((768, 512), 32), ((512, 512), 8)):
        rule = BucketRule(resolution, enable_bucket=True, min_size=256, max_size=2048, step=step)
        sizes = [(rng.randint(16, 5000), rng.randint(16, 5000)) for _ in range(800)]
        sizes += list(rule.buckets) + [(b[0] * 2, b[1] * 2) for b in rule.buckets] + [(1, 1000), (1000, 1)]
        for size in sizes:
            assert rule.assign(size)[0] == select_bucket(size, rule.buckets), (resolution, step, size)


def test_samples_pickle():
    sample = Sample(3, 0, 0, "/x/a.png", "a cat", None, (640, 480), (576, 448), (597, 448))
    assert pickle.loads(pickle.dumps(sample)) == sample


def test_sizes_without_metadata_are_read_once_and_cached_with_a_disk_cache(tmp_path):
    import json

    from PIL import Image

    from sdtune.data import DatasetOptions, build_plan
    from sdtune.data.sizes import SIZES_FILE

    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(96, 64), (64, 128), (80, 80)]):
        Image.new("RGB", size, (i * 50, 0, 0)).save(images / f"im{i}.png")
    (tmp_path / "meta.json").write_text(json.dumps({f"im{i}": {"caption": "x"} for i in range(3)}))

    def sizes(**disk):
        opts = DatasetOptions(in_json=str(tmp_path / "meta.json"), train_data_dir=str(images), resolution="64",
                              enable_bucket=True, min_bucket_reso=32, bucket_reso_steps=32, **disk)
        return [s.size for s in build_plan(opts, seed=0, warn=lambda _m: None).samples]

    assert sizes() == [(96, 64), (64, 128), (80, 80)]
    assert not (images / ".sdtune-cache").exists()  # without a disk-cache option nothing is written there
    assert sizes(cache_dir=str(tmp_path / "cache")) == [(96, 64), (64, 128), (80, 80)]
    (cached,) = (tmp_path / "cache").glob(f"*/{SIZES_FILE}")
    assert sorted(json.loads(cached.read_text())) == ["im0.png", "im1.png", "im2.png"]

    # im0's bytes become garbage of the same length and time: only the cache can still know its size
    garbage = images / "im0.png"
    st = garbage.stat()
    garbage.write_bytes(b"\0" * st.st_size)
    os.utime(garbage, ns=(st.st_atime_ns, st.st_mtime_ns))
    # im1 is replaced by a new image: a changed file is read again
    Image.new("RGB", (128, 64)).save(images / "im1.png")
    assert sizes(cache_dir=str(tmp_path / "cache")) == [(96, 64), (128, 64), (80, 80)]
    assert sizes() == [(128, 64), (80, 80)]  # without the cache im0 is found unreadable


def test_planning_leaves_the_cycle_collector_as_it_found_it(tmp_path):
    import gc
    import json

    import pytest

    from sdtune.data import DatasetOptions, build_plan
    from sdtune.errors import UserError

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"caption": "x", "image_size": [64, 64]}}))
    opts = DatasetOptions(in_json=str(tmp_path / "meta.json"), train_data_dir=str(images), resolution="64")
    missing = DatasetOptions(in_json=str(tmp_path / "none.json"), train_data_dir=str(images), resolution="64")
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            gc.enable() if enabled else gc.disable()
            assert len(build_plan(opts, seed=0, warn=lambda _m: None).samples) == 1
            assert gc.isenabled() is enabled
            with pytest.raises(UserError):  # a failed plan too
                build_plan(missing, seed=0, warn=lambda _m: None)
            assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
