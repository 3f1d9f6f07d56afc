"""A latent cached under another resize rounding is not reused: the cover size is part of the key."""

import dataclasses
import json

from PIL import Image

from sdtune.data.latent_cache import ensure_latent_cache, read_header
from sdtune.data.options import DatasetOptions
from sdtune.data.plan import build_plan
from sdtune.testing import build_tiny_model


def test_entry_from_the_old_rounding_is_reencoded(tmp_path):
    # 161x96 at resolution 64 (steps of 16) goes to the 80x48 bucket: heights match, width
    # 161 * 0.5 = 80.5, which sd-scripts rounds up to 81; Python's round() gave 80.
    (tmp_path / "img").mkdir()
    Image.new("RGB", (161, 96), (200, 30, 30)).save(tmp_path / "img" / "a.png")
    (tmp_path / "m.json").write_text(json.dumps({"a": {"caption": "a red picture"}}))
    opts = DatasetOptions(in_json=str(tmp_path / "m.json"), train_data_dir=str(tmp_path / "img"), resolution="64",
                          enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                          cache_latents_to_disk=True, max_data_loader_n_workers=0)
    vae = build_tiny_model("sd1", seed=0).vae
    plan = build_plan(opts, seed=0)
    sample = plan.samples[0]
    assert (sample.bucket, sample.resized) == ((80, 48), (81, 48))

    # an entry as the old rounding planned it
    old = build_plan(opts, seed=0)
    old.samples[0] = dataclasses.replace(sample, resized=(80, 48))
    first = ensure_latent_cache(old, vae, log=lambda m: None, progress=False)
    assert first.encoded == 1

    cache = ensure_latent_cache(plan, vae, log=lambda m: None, progress=False)
    assert (cache.encoded, cache.reused, dict(cache.reasons)) == (1, 0, {"resize changed": 1})
    entries = list((tmp_path / "img" / ".sdtune-cache").glob("a.*.safetensors"))
    assert len(entries) == 1  # the superseded entry is gone
    meta = json.loads(read_header(entries[0])["__metadata__"]["sdtune_cache"])
    assert meta["resized"] == [81, 48] and meta["crop"] == [0, 0, 80, 48]
