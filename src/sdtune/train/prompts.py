"""Sample-prompt files (`--sample_prompts`): .txt, .toml and .json as sd-scripts reads them.

Formats (as sd-scripts' `load_prompts` and `line_to_prompt_dict` read them):

* `.txt` — one prompt per line, `#` starts a comment line. Options follow the prompt as
  ` --flag value`: `--n` negative prompt, `--w` width, `--h` height, `--s` steps, `--l` CFG scale,
  `--d` seed, `--ss` sampler.
* `.toml` — a `[prompt]` table of defaults and `[[prompt.subset]]` entries, each one prompt.
* `.json` — a list whose items are prompt dicts or strings in the .txt line syntax.

Dict keys are sd-scripts' own: prompt, negative_prompt, width, height, sample_steps, scale, seed,
sample_sampler. Where sd-scripts silently ignores what it does not understand (a misspelt flag, a
FLUX-only `--g`), we refuse with the file and line, so a prompt never samples other than written.
A subset entry may override a `[prompt]` default (sd-scripts crashes on that). No torch here.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.errors import UserError
from sdtune.train.samplers import normalize_sampler

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["SamplePrompt", "load_prompts", "parse_prompt_line", "prompt_from_dict", "round_size",
           "DEFAULT_STEPS", "DEFAULT_SCALE", "MAX_STEPS"]

log = logging.getLogger(__name__)

DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
MAX_STEPS = 1000  # sd-scripts clamps --s to 1..1000; so do we, with a notice

# .txt flag -> dict key (sd-scripts' `line_to_prompt_dict`)
_FLAGS = {"n": "negative_prompt", "w": "width", "h": "height", "s": "sample_steps", "l": "scale", "d": "seed",
          "ss": "sample_sampler"}
# Likely names for sd-scripts' keys, for the "did you mean" of an unknown key.
_HINTS = {"steps": "sample_steps", "negative": "negative_prompt", "sampler": "sample_sampler", "cfg": "scale",
          "cfg_scale": "scale", "w": "width", "h": "height", "n": "negative_prompt", "d": "seed", "s": "sample_steps",
          "l": "scale", "ss": "sample_sampler"}
_KEYS = ("prompt", "negative_prompt", "width", "height", "sample_steps", "scale", "seed", "sample_sampler")
# Options sd-scripts reads for other architectures (FLUX, SD3, Lumina, ControlNet): refused by name.
_OTHER_FLAGS = {"g": "guidance_scale", "cn": "controlnet_image", "ctr": "cfg_trunc_ratio", "rcfg": "renorm_cfg",
                "fs": "flow_shift"}


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt to sample; None means "the run's default" (family resolution, run seed, --sample_sampler)."""

    index: int  # position in the file: names the image (sd-scripts' "enum")
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: int | None = None
    sampler: str | None = None
    where: str = ""  # "file:line" for messages


def round_size(value: int) -> int:
    """sd-scripts' rounding of a sample size: down to a multiple of 8, at least 64.

    8 (not 64) is enough: the VAE downsamples by 8 and the U-Net pads odd latent sizes itself.
    """
    return max(64, value - value % 8)


def load_prompts(path: str | Path, flag: str = "--sample_prompts") -> list[SamplePrompt]:
    """Read a prompt file; every mistake is a `UserError` naming the file and line or entry (and
    `flag`, the option that named the file, where the fix is to change it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("sample prompt file not found", where=str(path), fix=f"Check {flag}.")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise UserError(f"unknown prompt file type {path.suffix or '(none)'!r}", where=str(path),
                        fix="Use a .txt (one prompt per line), .toml or .json file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError("not a UTF-8 text file", where=str(path)) from None
    if suffix == ".txt":
        prompts = _from_txt(text, str(path))
    elif suffix == ".toml":
        prompts = _from_toml(text, str(path))
    else:
        prompts = _from_json(text, str(path))
    if not prompts:
        raise UserError("the file holds no prompts", where=str(path),
                        fix=f"Add at least one prompt, or drop {flag}.")
    return prompts


def _from_txt(text: str, name: str) -> list[SamplePrompt]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(prompt_from_dict(parse_prompt_line(line, f"{name}:{lineno}"), len(out), f"{name}:{lineno}"))
    return out


def _from_toml(text: str, name: str) -> list[SamplePrompt]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"not valid TOML ({exc})", where=name) from None
    table = data.get("prompt")
    if not isinstance(table, dict):
        raise UserError("no [prompt] table", where=name,
                        fix='Write [prompt] with defaults, then one [[prompt.subset]] with prompt = "..." per image.')
    extra = sorted(set(data) - {"prompt"})
    if extra:
        raise UserError(f"unexpected top-level key(s) {', '.join(extra)}", where=name,
                        fix="Everything belongs under [prompt] and [[prompt.subset]].")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    subsets = table.get("subset")
    if subsets is None:
        if "prompt" in defaults:  # a lone [prompt] table with its prompt: one image
            return [prompt_from_dict(defaults, 0, f"{name}: [prompt]")]
        raise UserError("no [[prompt.subset]] entries", where=name, fix='Add [[prompt.subset]] with prompt = "...".')
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise UserError("prompt.subset must be an array of tables", where=name, fix="Write each as [[prompt.subset]].")
    return [prompt_from_dict({**defaults, **s}, i, f"{name}: [[prompt.subset]] #{i + 1}") for i, s in enumerate(subsets)]


def _from_json(text: str, name: str) -> list[SamplePrompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON ({exc.msg})", where=f"{name}:{exc.lineno}") from None
    if not isinstance(data, list):
        raise UserError(f"expected a list of prompts, found a {type(data).__name__}", where=name,
                        fix='Write [{"prompt": "...", "seed": 1}, "a prompt --w 512", ...].')
    out = []
    for i, item in enumerate(data):
        where = f"{name}: item {i + 1}"
        if isinstance(item, str):
            item = parse_prompt_line(item.strip(), where)
        elif not isinstance(item, dict):
            raise UserError(f"expected a prompt object or string, found {type(item).__name__}", where=where)
        out.append(prompt_from_dict(item, i, where))
    return out


def parse_prompt_line(line: str, where: str = "prompt") -> dict[str, Any]:
    """A .txt line as sd-scripts' dict: `a cat --n blurry --w 640 --d 3` -> {"prompt": "a cat", ...}.

    The line is split on " --" as sd-scripts does; the first piece is the prompt. Flags are
    case-insensitive. Values are converted in `prompt_from_dict`.
    """
    pieces = line.split(" --")
    result: dict[str, Any] = {"prompt": pieces[0].strip()}
    for piece in pieces[1:]:
        flag, _, value = piece.strip().partition(" ")
        flag, value = flag.lower(), value.strip()
        if flag in _OTHER_FLAGS:
            raise UserError(f"--{flag} ({_OTHER_FLAGS[flag]}) is an option for other model architectures, "
                            "not Stable Diffusion 1.x/2.x", where=where,
                            fix="Remove it; the CFG scale of SD is --l.")
        if flag not in _FLAGS:
            known = ", ".join(f"--{f}" for f in _FLAGS)
            raise UserError(f"unknown prompt option --{flag}", where=where,
                            fix=f"Known options: {known}. A literal ' --' inside a prompt is not possible.")
        if not value:
            raise UserError(f"--{flag} needs a value", where=where)
        key = _FLAGS[flag]
        if key in result:
            raise UserError(f"--{flag} given twice", where=where)
        result[key] = value if key in ("negative_prompt", "sample_sampler") else _number(value, flag, where)
    return result


def _number(value: str, flag: str, where: str) -> int | float:
    try:
        return float(value) if flag == "l" else int(value)
    except ValueError:
        kind = "a number" if flag == "l" else "a whole number"
        raise UserError(f"--{flag} expects {kind}, got {value!r}", where=where) from None


def prompt_from_dict(item: dict[str, Any], index: int, where: str) -> SamplePrompt:
    """A validated `SamplePrompt` from sd-scripts' prompt dict."""
    from sdtune.config import suggest

    for key in item:
        if key in _KEYS:
            continue
        if key in _OTHER_FLAGS.values():
            raise UserError(f"{key!r} is an option for other model architectures, not Stable Diffusion 1.x/2.x",
                            where=where, fix="Remove it; the CFG scale of SD is 'scale'.")
        hint = f" (did you mean {_HINTS[key]!r}?)" if key in _HINTS else suggest(key, _KEYS)
        raise UserError(f"unknown key {key!r}{hint}", where=where, fix=f"Known keys: {', '.join(_KEYS)}.")
    prompt = item.get("prompt")
    if not isinstance(prompt, str):
        raise UserError("missing prompt" if prompt is None else f"prompt must be text, got {type(prompt).__name__}",
                        where=where, fix='Give prompt = "...".')
    negative = item.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise UserError("negative_prompt must be text", where=where)
    width = _int(item, "width", where, minimum=8)
    height = _int(item, "height", where, minimum=8)
    for key, value in (("width", width), ("height", height)):
        if value is not None and round_size(value) != value:
            log.warning("%s: %s %d is rounded to %d (a multiple of 8, at least 64)", where, key, value, round_size(value))
    steps = _int(item, "sample_steps", where, minimum=1)
    if steps is not None and steps > MAX_STEPS:
        log.warning("%s: %d sampling steps clamped to %d", where, steps, MAX_STEPS)
        steps = MAX_STEPS
    scale = item.get("scale", DEFAULT_SCALE)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
        raise UserError(f"scale (CFG) must be a number of 0 or more, got {scale!r}", where=where)
    seed = _int(item, "seed", where, minimum=0, maximum=2**63 - 1)
    sampler = item.get("sample_sampler")
    if sampler is not None:
        if not isinstance(sampler, str):
            raise UserError("sample_sampler must be text", where=where)
        sampler = normalize_sampler(sampler, where=where)
    return SamplePrompt(index, prompt, negative, width, height, DEFAULT_STEPS if steps is None else steps,
                        float(scale), seed, sampler, where)


def _int(item: dict[str, Any], key: str, where: str, *, minimum: int, maximum: int = 1 << 20) -> int | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise UserError(f"{key} must be a whole number from {minimum} to {maximum}, got {value!r}", where=where)
    return value
