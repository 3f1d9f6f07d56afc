"""sdtune.seeds.derive: the documented formula (checked with numpy's wrapping uint64 arithmetic, not
Python's masked big integers), distinct draws for distinct keys, the same values in every process."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sdtune import seeds

SRC = Path(__file__).resolve().parents[1] / "src"


def _by_numpy(seed: int, *keys: int) -> int:
    """The docstring's formula in uint64 arithmetic, which wraps by itself."""
    with np.errstate(over="ignore"):
        g = np.uint64(0x9E3779B97F4A7C15)
        x = g
        for k in (seed, *keys):
            x ^= np.uint64(k) + g + (x << np.uint64(6)) + (x >> np.uint64(2))
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
    return int(x) & (2**63 - 1)


def test_derive_is_the_documented_formula():
    for key in [(0,), (42,), (42, 0, 0, 0), (42, 3, 17, 1), (2**32 - 1, 5), (1234, seeds.BF16_ROUNDING), (7, 9)]:
        assert seeds.derive(*key) == _by_numpy(*key), key


def test_distinct_keys_give_distinct_seeds_in_range():
    keys = list(itertools.product(range(4), range(10), range(20), range(4)))  # seed, epoch, position, rank
    values = [seeds.derive(*k) for k in keys]
    assert len(set(values)) == len(keys)
    assert all(0 <= v < 2**63 for v in values)
    # order matters and a key is not confused with a shorter tuple
    assert seeds.derive(42, 1, 2) != seeds.derive(42, 2, 1)
    assert seeds.derive(42, 0) != seeds.derive(42) != seeds.derive(42, 0, 0)
    assert seeds.derive(42, seeds.BF16_ROUNDING) not in values


CODE = """
import json
from sdtune import seeds
print(json.dumps([seeds.derive(42, 1, 2, 3), seeds.augmentation_seed(42, 1, 2, 3),
                  seeds.caption_rng(42, 1, 2).random(), seeds.epoch_order_rng(42, 1).random(),
                  seeds.sample_image_seed(42, 3)]))
"""


def test_the_same_in_every_process_whatever_the_hash_seed():
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True)
        outs.append(json.loads(out.stdout))
    assert outs[0] == outs[1]
    assert outs[0][0] == _by_numpy(42, 1, 2, 3)


def test_caption_and_sample_image_seeds_follow_their_documented_sources():
    import hashlib
    import random

    digest = hashlib.blake2b(b"sdtune-caption:42:1:2", digest_size=16).digest()
    assert seeds.caption_rng(42, 1, 2).random() == random.Random(int.from_bytes(digest, "big")).random()
    value = seeds.sample_image_seed(42, 3)
    assert 0 <= value < 2**32  # short enough to type as --d
    assert value == int(np.random.SeedSequence([42, 3]).generate_state(1)[0])
