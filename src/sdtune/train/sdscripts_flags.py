"""sd-scripts fine_tune.py flags that sdtune recognises but does not implement (yet).

They are accepted by the parser (so the user is not told "unrecognized") and then refused with a
message naming the flag, instead of being silently ignored as sd-scripts does with some of its own.
The list shrinks as features land; a flag moves from here to a typed option when it acts.

Every flag of sd-scripts' fine_tune.py parser is listed in sdscripts_fine_tune_flags.txt (generated
from its parser by scripts/sdscripts_fine_tune_flags.py); tests/test_sdscripts_flags.py checks that
each one is a typed option or refused here.
"""

from __future__ import annotations

import argparse

# flag -> why / what to do instead
NOT_SUPPORTED: dict[str, str] = {
    "fp8_base": "fp8 base weights are not supported for full fine-tuning",
    "dataset_class": "custom dataset classes are not supported; use a dataset TOML",
    "debug_dataset": "the OpenCV dataset viewer is not supported; use --dry_run to inspect buckets",
    "huggingface_repo_id": "uploading to the Hugging Face hub is not supported",
    **{name: "uploading to the Hugging Face hub is not supported" for name in (
        "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility",
        "save_state_to_huggingface", "async_upload")},
    "caption_extension": "fine-tuning reads captions from the metadata file (sd-scripts' fine_tune.py ignores this "
                         "flag too); to gather caption files into one, use sdtune merge --caption_extension",
    "caption_extention": "fine-tuning reads captions from the metadata file (sd-scripts' fine_tune.py ignores this "
                         "flag too); to gather caption files into one, use sdtune merge --caption_extension",
    "cache_info": "it caches DreamBooth folder scans, which fine-tuning does not make (sd-scripts' fine_tune.py "
                  "ignores it too)",
    "resume_from_huggingface": "resuming from the Hugging Face hub is not supported",
    "lowram": "--lowram is not supported",
    "highvram": "--highvram is not supported",
    "tokenizer_cache_dir": "not needed: sdtune ships its tokenizers",
    "skip_until_initial_step": "not needed: --resume continues at the exact batch where the state was saved "
                               "(--initial_step only sets the counters, as without this flag in sd-scripts)",
}

# Flags that sd-scripts documents and sdtune means to implement; refused until then, so that none is
# silently ignored.
PLANNED: dict[str, str] = {}


def add_hidden_flags(parser: argparse.ArgumentParser, taken: set[str]) -> None:
    """Accept the known-but-unsupported flags (hidden from --help) so they can be refused clearly."""
    for name in {**PLANNED, **NOT_SUPPORTED}:
        if name in taken:
            continue
        parser.add_argument(f"--{name}", dest=f"_unsupported_{name}", nargs="?", const=True,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def refused(args: argparse.Namespace) -> list[str]:
    """One message per known-but-unsupported flag the user gave."""
    out = []
    for key in vars(args):
        if key.startswith("_unsupported_"):
            name = key.removeprefix("_unsupported_")
            out.append(f"--{name}: {_why(name)}")
    return out


def refused_keys(keys, where: str) -> list[str]:
    """The same messages for keys of a --config_file (sd-scripts' config files hold flag names)."""
    return [f"{where}: {name}: {_why(name)}" for name in keys if name in NOT_SUPPORTED or name in PLANNED]


def _why(name: str) -> str:
    return NOT_SUPPORTED.get(name) or PLANNED[name]
