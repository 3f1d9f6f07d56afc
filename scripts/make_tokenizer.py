"""Regenerate the CLIP tokenizer files shipped in src/sdtune/assets/.

The real CLIP BPE table is not downloadable here (no Hugging Face hub), but `open_clip_torch`
ships OpenAI's `bpe_simple_vocab_16e6.txt.gz`. This script rebuilds `vocab.json` and
`merges.txt` from it the way OpenAI's SimpleTokenizer builds its tables, and writes them with
the family-specific `tokenizer_config.json` / `special_tokens_map.json` into each shipped
family folder (SD1 pads with <|endoftext|>, SD2 with "!" = id 0).

    pip install --no-deps open_clip_torch   # carrier of the BPE file only; never imported
    python scripts/make_tokenizer.py
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "sdtune" / "assets"
PAD = {"sd1": "<|endoftext|>", "sd2": "!", "sd2-v": "!"}


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+n.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def find_bpe() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_clip_torch is not installed: pip install --no-deps open_clip_torch")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def build(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def main() -> None:
    vocab, merges = build(find_bpe())
    assert len(vocab) == 49408, len(vocab)
    for family, pad in PAD.items():
        out = ASSETS / family / "tokenizer"
        out.mkdir(parents=True, exist_ok=True)
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad, "unk_token": "<|endoftext|>"}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        config = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
                  "clean_up_tokenization_spaces": True}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
