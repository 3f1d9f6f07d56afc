"""Every seed sdtune derives from the run's --seed, in one module.

`derive(seed, *keys)` is the scheme: a 63-bit seed from the run's seed and integer keys that name
the draw (epoch, batch position, rank, a purpose constant...), by SplitMix64 mixing, so that nearby
key tuples (epoch 1 batch 2 / epoch 2 batch 1) give unrelated streams. It is plain integer
arithmetic: the same value in every process, on every machine, whatever PYTHONHASHSEED. Uses:

- training noise and timesteps: `derive(seed, epoch, position, rank)`;
- bf16 stochastic rounding: `derive(seed, BF16_ROUNDING)` (the same on every process, so replicas
  stay identical);
- validation noise: `derive(seed, sample_index)` (the same at every validation).

New draws use `derive` with a new purpose constant as their first key.

Four older derivations are kept as they are, below, each for its one use: moving them to `derive`
would change what every existing run draws for the same --seed (the order of batches, the flips,
crops and colour changes, which captions are dropped or shuffled, the sample images' seeds), so a
run resumed with a newer sdtune would change course mid-way, and the sample seeds written next to
images (to type as --d) would no longer reproduce them. They are stable across processes too.
"""

from __future__ import annotations

import hashlib
import random

_MASK64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, SplitMix64's increment

# A purpose constant: the first key of a draw that has no epoch or position.
BF16_ROUNDING = 0xBF16


def derive(seed: int, *keys: int) -> int:
    """A 63-bit seed for the draw named by `keys` in the run seeded by `seed`.

    Per key k (the seed first), with x starting at the golden-ratio constant G = 0x9E3779B97F4A7C15:
    x ^= (k + G + (x << 6) + (x >> 2)) mod 2**64 (boost's hash_combine), then the SplitMix64
    finaliser x = (x ^ x >> 30) * 0xBF58476D1CE4E5B9, x = (x ^ x >> 27) * 0x94D049BB133111EB,
    x ^= x >> 31 (products mod 2**64). The result is x's low 63 bits, so it fits torch's manual_seed
    and numpy's seed."""
    x = _GOLDEN
    for k in (seed, *keys):
        x ^= (k + _GOLDEN + (x << 6) + (x >> 2)) & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Older derivations, kept for the draws they give (see the module's docstring)


def epoch_order_rng(seed: int, epoch: int) -> random.Random:
    """The generator that shuffles one epoch's samples and batches (the same on every rank)."""
    return random.Random(f"sdtune-sampler/{seed}/{epoch}")


def augmentation_seed(seed: int, epoch: int, batch_number: int, slot: int) -> int:
    """The seed of one sample's flip, crop and colour draws: 63 bits of `random.Random` seeded with the
    key as a string (which Python hashes with SHA-512, not with the per-process str hash)."""
    return random.Random(f"sdtune-sample/{seed}/{epoch}/{batch_number}/{slot}").getrandbits(63)


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The private generator of one sample's caption in one epoch: same inputs, same draws, on every rank."""
    digest = hashlib.blake2b(f"sdtune-caption:{seed}:{epoch}:{index}".encode(), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "big"))


def sample_image_seed(run_seed: int, prompt_index: int) -> int:
    """The seed of a sample prompt without its own --d: 32 bits, short enough to type as --d."""
    import numpy as np

    return int(np.random.SeedSequence([run_seed % (1 << 63), prompt_index]).generate_state(1)[0])
