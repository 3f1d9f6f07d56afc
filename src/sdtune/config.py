"""Typed options, validated once at the edge.

Every area declares its options as a pydantic model (subclass of `Options`) whose field names are
sd-scripts' flag names. From such a model this module derives

* the argparse flags (`add_options(parser, Model)`), so a flag cannot exist without a typed field,
* the merge of command line, `--config_file` TOML and defaults (`parse_options`), with
  precedence command line > config file > default, and "did you mean" for unknown keys,

and turns every validation failure into a one-line `UserError` naming the flag or file and key.
Code below the CLI only ever sees the validated, frozen options object. No torch here.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic import Field as _Field

from sdtune.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class Options(BaseModel):
    """Base of all option models: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def resolved(self, name: str) -> Any:
        """The option's value, or what not giving it means (its declared `implied` value)."""
        value = getattr(self, name)
        return implied_value(type(self), name) if value is None else value


# What an option's value may do between the run that saved a training state and the run resuming it:
#   "same"        it shapes the arithmetic of training, so a different value is refused unless
#                 --resume_allow_changes is given (the default: a new option is safe until classified);
#   "may_change"  where things go, how often they are saved, logged or sampled, where the data lives;
#   "length"      how long to train: may change, with a note when the learning-rate schedule depends on it.
RESUME_FACTS = ("same", "may_change", "length")


def Field(default: Any = None, help: str = "", *, aliases: tuple[str, ...] = (), metavar: str | None = None,
          group: str | None = None, secret: bool = False, resume: str = "same", implied: Any = None,
          **kwargs: Any) -> Any:
    """A pydantic field with the CLI details (help text, extra flag spellings, help group) and the facts
    about the option that other code asks for by name (`option_names`, `implied_value`).

    `secret=True` marks a credential (an API key): `public_options` leaves it out of every options
    dict that is written to a file or shown, and the options object's repr hides it.
    `resume` says whether the option may differ on resume (RESUME_FACTS).
    `implied` is the value that a default of None stands for, where None itself means "not given" (an
    option that only acts when given); the help shows it, and code reads it with `implied_value`.
    """
    if resume not in RESUME_FACTS:
        raise ValueError(f"resume={resume!r}: expected one of {RESUME_FACTS}")
    extra = {"aliases": list(aliases), "metavar": metavar, "group": group, "secret": secret, "resume": resume,
             "implied": implied}
    if secret:
        kwargs.setdefault("repr", False)
    return _Field(default, description=help, json_schema_extra=extra, **kwargs)


def _facts(info: Any) -> dict[str, Any]:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


@functools.cache  # a model's fields are fixed when its class is made
def option_names(model: type[BaseModel], **facts: Any) -> tuple[str, ...]:
    """The fields of `model` declared with all the given facts (e.g. `resume="may_change"`), in order."""
    return tuple(name for name, info in model.model_fields.items()
                 if all(_facts(info).get(key) == value for key, value in facts.items()))


def secret_names(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` declared with `secret=True`."""
    return frozenset(option_names(model, secret=True))


def implied_value(model: type[BaseModel], name: str) -> Any:
    """What the option means when not given: its `implied` value, else its default."""
    info = model.model_fields[name]
    implied = _facts(info).get("implied")
    return info.default if implied is None else implied


def public_options(opts: BaseModel) -> dict[str, Any]:
    """The options as JSON-able values without the secrets: the one form in which options are written
    to a file (state, summary, tracker, TOML) or printed."""
    return opts.model_dump(mode="json", exclude=set(secret_names(type(opts))))


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _literal_choices(tp: Any) -> list[Any] | None:
    tp = _unwrap_optional(tp)
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    return None


def add_options(parser: argparse.ArgumentParser, model: type[Options], title: str | None = None) -> None:
    """Add one flag per field of `model`. Defaults are suppressed so that only given flags count."""
    groups: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra or {}
        group_name = extra.get("group") or title
        if group_name:
            target = groups.setdefault(group_name, parser.add_argument_group(group_name))
        else:
            target = parser
        tp = _unwrap_optional(info.annotation)
        flags = [f"--{name}"] + [f"--{a}" for a in extra.get("aliases") or []]
        help_text = info.description or ""
        if extra.get("implied") is not None:
            help_text += f" (default: {extra['implied']})"
        elif info.default not in (None, False, "", [], ()):
            help_text += f" (default: {info.default})"
        # argparse treats "%" in help as a format directive ("%(default)s").
        help_text = help_text.replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        choices = _literal_choices(info.annotation)
        if tp is bool:
            target.add_argument(*flags, action="store_true", **kwargs)
            continue
        if choices is not None:
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
        elif get_origin(tp) in (list, tuple) or tp in (list, tuple):
            kwargs["nargs"] = "*"
        elif tp in (int, float):
            kwargs["type"] = tp
        if extra.get("metavar"):
            kwargs["metavar"] = extra["metavar"]
        target.add_argument(*flags, **kwargs)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found", where=str(path), fix="Check the path.")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        fix = None
        if "\\" in str(exc):  # a Windows path in "double quotes", where backslashes are escapes
            fix = ("Write Windows paths in single quotes ('C:\\data\\img'), which take backslashes "
                   "literally, or with forward slashes (\"C:/data/img\").")
        raise UserError(f"not valid TOML ({exc})", where=str(path), fix=fix) from None
    except UnicodeDecodeError:
        raise UserError("not a UTF-8 text file", where=str(path)) from None


def flatten_config_file(data: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts' `--config_file`: sections are only for readability; their keys are merged."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def suggest(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(values: dict[str, Any], model: type[Options], where: str) -> None:
    known = set(model.model_fields)
    for key in values:
        if key not in known:
            raise UserError(f"unknown option {key!r}{suggest(key, known)}", where=where)


def parse_options(model: type[Options], args: argparse.Namespace | dict[str, Any],
                  config_file: str | Path | None = None, *, exclude: typing.Iterable[str] = ()) -> Any:
    """Validate the given flags (and a TOML config file) into a frozen `model` instance."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    for key in list(given):
        if key.startswith("_") or key in exclude:
            given.pop(key)
    values: dict[str, Any] = {}
    if config_file:
        file_values = flatten_config_file(read_toml(config_file))
        check_keys(file_values, model, str(config_file))
        values.update(file_values)
    values.update({k: v for k, v in given.items() if k in model.model_fields})
    try:
        return model(**values)
    except ValidationError as exc:
        raise _user_error(exc, config_file) from None


def _user_error(exc: ValidationError, config_file: str | Path | None) -> UserError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "options"
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown option"
    where = f"--{loc}" if loc != "options" else "options"
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    hint = f" (from the command line or {config_file})" if config_file else ""
    return UserError(f"{msg}{more}{hint}", where=where)
