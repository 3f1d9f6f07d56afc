"""`--config_file` names and `--output_config`: a training command line written as a TOML file.

As in sd-scripts, `--config_file NAME` means `NAME.toml` unless the name ends in `.toml`, and
`--output_config --config_file NAME` writes the options given on the command line to that file and
exits, without training; the file is then read back by `--config_file NAME`. The keys are the flag
names, so sd-scripts reads the file too. The file must not exist yet (sd-scripts refuses too): a
config is never overwritten. No torch here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sdtune.errors import UserError


def config_path(name: str | Path) -> str:
    """sd-scripts' rule: NAME without .toml means NAME.toml. A file given by its exact name that is not
    .toml (which sd-scripts would not find) is read as it is."""
    name = str(name)
    if name.endswith(".toml"):
        return name
    if not Path(name + ".toml").exists() and Path(name).is_file():
        return name
    return name + ".toml"


def write_config(args: Any, opts: Any) -> Path:
    """Write the options given on the command line (validated as for a run) to --config_file."""
    from sdtune.config import public_options, secret_names
    from sdtune.console import note
    from sdtune.atomic import atomic_write_text

    given = getattr(args, "config_file", None)
    if not given:
        raise UserError("needs the file to write", where="--output_config", fix="Add --config_file NAME (NAME.toml is written).")
    path = Path(str(given) if str(given).endswith(".toml") else str(given) + ".toml")
    if path.exists():
        raise UserError("already exists; nothing was written", where=str(path),
                        fix="Choose another --config_file name, or remove the file first.")
    # a secret has no place in a file that gets shared (sd-scripts leaves the API key out too)
    values = {k: _number_if_numeric(type(opts), k, v) for k, v in public_options(opts).items()}
    keys = [k for k in vars(args) if values.get(k) is not None]
    lines = ["# written by sdtune --output_config; train with: sdtune train --config_file " + str(path), ""]
    lines += [f"{key} = {toml_value(values[key], key)}" for key in keys]
    try:
        atomic_write_text(path, "\n".join(lines) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the config file ({exc.strerror or exc})", where=str(path)) from None
    secret = sorted(secret_names(type(opts)) & set(vars(args)))
    note(f"wrote {path} ({len(keys)} options){'; left out: ' + ', '.join(secret) + ' (a secret)' if secret else ''}")
    return path


def _number_if_numeric(model: Any, key: str, value: Any) -> Any:
    """A "step count or fraction" option given as text ("500", "0.1") is written as the number sd-scripts'
    int_or_float reads from its command line (500, 0.1): sd-scripts takes a string from a TOML file as it
    is, and its schedule would fail on it. "5%" stays text."""
    from typing import get_args

    if not isinstance(value, str) or float not in get_args(model.model_fields[key].annotation):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def toml_value(value: Any, key: str = "") -> str:
    """A TOML value for the option types: strings, numbers, booleans and lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are TOML's basic-string escapes; DEL must be escaped in TOML only
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, key) for v in value) + "]"
    raise TypeError(f"{key}: cannot write {type(value).__name__} to TOML")
