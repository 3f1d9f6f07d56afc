"""The `sdtune` command line: one argparse tree, one line per user error.

Each subcommand lives in its own module with two functions:

    add_arguments(parser)   defines the flags; the module imports no torch at top level
    run(args) -> int        does the work; heavy imports go inside

so `sdtune --help`, `sdtune <cmd> --help` and option validation stay fast.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import faulthandler
import importlib
import os
import re
import signal
import sys
import threading
from typing import NoReturn

from sdtune.console import keep_bitsandbytes_unloaded, log_error
from sdtune.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sdtune.train.command", "fine-tune a model (accepts sd-scripts fine_tune.py flags)"),
    "cache": ("sdtune.data.command", "sort images into buckets and cache their VAE latents"),
    "sample": ("sdtune.sample_command", "make images from a model, optionally with a hypernetwork at a multiplier"),
    "convert": ("sdtune.checkpoint.command", "convert a checkpoint between formats and precisions"),
    "caption": ("sdtune.prep.caption_command", "write BLIP captions next to images"),
    "tag": ("sdtune.prep.tag_command", "write WD14 / DeepDanbooru tags next to images"),
    "merge": ("sdtune.prep.merge_command", "merge caption and tag files into a metadata file"),
    "clean": ("sdtune.prep.clean_command", "clean captions and tags in a metadata file"),
    "prepare_buckets_latents": ("sdtune.data.prepare_legacy",
                                "sd-scripts' finetune/prepare_buckets_latents.py command line (runs cache)"),
    "demo": ("sdtune.demo", "build a tiny model and dataset, train it, show the results"),
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line, with a "did you mean" for unknown options.

    Abbreviated flags are not accepted: a prefix that is unique today can become ambiguous when a
    flag is added, and a training script must not change meaning between versions.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        if message.startswith("unrecognized arguments:"):
            known = _option_strings(self)
            hints = []
            for arg in message.split(":", 1)[1].split():
                if arg.startswith("-"):
                    close = difflib.get_close_matches(arg.split("=")[0], known, n=1)
                    if close:
                        hints.append(f"{arg} (did you mean {close[0]}?)")
                        continue
                hints.append(arg)
            message = "unrecognized arguments: " + " ".join(hints)
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every visible flag of `parser` and its subcommands (unknown arguments are reported at the root)."""
    out = []
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            out += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _option_strings(sub)
    return out


def build_parser(command: str | None = None, prog: str = "sdtune") -> Parser:
    """The parser tree; only `command`'s module is imported (the others just list their help).

    `prog` names the program in usage lines: sd-scripts-style wrappers (fine_tune.py,
    finetune/*.py) call `main([...], prog=...)` so their help and errors use their own name.
    """
    parser = Parser(prog=prog, description="Full fine-tuning of Stable Diffusion 1.x and 2.x.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text,
                             **({"prog": prog} if prog != "sdtune" and name == command else {}))
        if name == command:
            cmd.add_argument("--debug", action="store_true", help="show tracebacks for errors")
            importlib.import_module(module).add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def _version() -> str:
    from sdtune import __version__

    return f"sdtune {__version__}"


# A negative number as a flag's value: -1, -0.5, -.5, -1e-5, -2E+3.
_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def attach_negative_numbers(argv: list[str]) -> list[str]:
    """`--flag -1e-5` as `--flag=-1e-5`.

    argparse takes a value that starts with "-" for a flag unless it looks like a plain negative
    number (its pattern misses exponents such as -1e-5), and then reports "expected one argument"
    instead of the value's real problem. Attached with "=", the value reaches validation, which
    gives the range message.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if (arg.startswith("--") and "=" not in arg and i + 1 < len(argv)
                and _NEGATIVE_NUMBER.fullmatch(argv[i + 1])):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def show_stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints where every thread of the process is to its stderr, and it goes on: for
    a run that seems stuck (a process of a multi-GPU launch waiting for another, storage that stopped
    answering). POSIX only; a process without a real stderr (pythonw) goes without."""
    if not hasattr(faulthandler, "register"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no stderr, or one without a file descriptor
        pass


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = attach_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None, prog or "sdtune")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("SDTUNE_DEBUG") == "1"
    show_stacks_on_sigusr1()
    keep_bitsandbytes_unloaded()  # imported by an 8-bit optimizer only, not with every model
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as exc:
        if debug:
            raise
        sys.stderr.write(f"error: {exc.message}\n")
        log_error(f"error: {exc.message}")  # also into --console_log_file, when the run opened one
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write("interrupted\n")
        return 130


def run_and_exit(argv: list[str] | None = None, prog: str | None = None) -> NoReturn:
    """`main`, then the process ends without Python's teardown: the `sdtune` command, `python -m
    sdtune` and the sd-scripts-named scripts end here.

    Python's ordinary exit frees every module's objects one by one. With torch, transformers and
    diffusers loaded that took 1.3-3.4 s of the 2-core test machine's CPU (measured: `import torch`
    alone 1.3 s; a two-step training run 17.2 s with it, 13.7 s without), in every process of a
    multi-GPU run too. Once `main` has returned, its files are written and closed and its processes
    joined; the exit handlers still run here as in an ordinary exit (logging closes its files,
    temporary folders go, libraries finish their own), and only the teardown after them is left out.
    A thread still running (not a daemon) gets the ordinary exit, which waits for it; an exception
    from `main` ends the process as it always did.
    """
    code = main(argv, prog)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # no public way to run them before os._exit, which would skip them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: Python's own exit would only report it
            pass
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
