"""Terminal output shared by the commands: sdtune's own lines, the libraries' logging, a log file.

sdtune's own lines (the plan, notes, saves) go through `note()`; a line that starts with "note:" or
"warning:" is a warning, any other an information. By default they are printed on stdout as plain
lines, the libraries' warnings on stderr, and the libraries' own notices and progress bars are off.

`setup_console()` applies sd-scripts' logging flags:

    --console_log_level L    lines below L are not shown: ours, the libraries' (Python logging,
                             transformers, diffusers) and Python warnings
    --console_log_file F     the lines go to F instead of the terminal (appended, one write per
                             line, "time LEVEL message"); the progress bar stays on the terminal
    --console_log_simple     plain lines: the libraries' lines on stdout with ours, as print()
                             does; in the file, the message alone

Streams: stdout carries everything sdtune says (plans, model, notes, warnings, saves, summaries);
stderr carries only the error line that ends a command, the progress bar and the libraries' own
lines, so `2>/dev/null` hides the libraries' noise and nothing of ours.

Counts in messages go through `plural()` ("1 image", "2 images").

bitsandbytes is imported only for an 8-bit optimizer (`keep_bitsandbytes_unloaded`,
`quiet_import`): diffusers would otherwise import it with every model, which costs seconds and, on
some CPUs, prints a line about an optional kernel package.

No torch here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import io
import logging
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

from sdtune.errors import UserError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FILE_FORMAT = "%(asctime)s %(levelname)-8s %(message)s"
_LOG = logging.getLogger("sdtune.console")


class _Terminal(logging.Handler):
    """Plain lines on the *current* sys.stdout / sys.stderr (tests and progress bars replace them)."""

    def __init__(self, stream_name: str = "stdout"):
        super().__init__()
        self.stream_name = stream_name
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if getattr(record, "stderr", False) else getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never stop a run
            self.handleError(record)


class _AppendFile(logging.Handler):
    """Each record appended to the file in one write(2) on an O_APPEND descriptor, so the lines of
    several processes never interleave and a crash leaves only whole lines."""

    def __init__(self, path: Path, fmt: str):
        super().__init__()
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write the log file ({exc.strerror or exc})", where=str(path),
                            fix="Give --console_log_file a path in a writable folder.") from None
        self.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - a full disk must not stop training; the line is lost
            self.handleError(record)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        super().close()


_installed: list[tuple[logging.Logger, logging.Handler]] = []
_file: _AppendFile | None = None
_library_level: int | None = None
_root_level: int | None = None  # the root logger's level before setup_console changed it


def note(message: str, *, stderr: bool = False) -> None:
    """One of sdtune's own lines: a warning when it starts with "note:" / "warning:", else information."""
    head = message.lstrip().lower()
    level = logging.WARNING if head.startswith(("note:", "warning:")) else logging.INFO
    _LOG.log(level, message, extra={"stderr": stderr})


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """ "1 image", "3 images", "0 images", "2 batches", "4 entries"; `plural_form` for other nouns.
    The last word of `noun` is the one counted ("1 tag line", "2 tag lines")."""
    if n == 1:
        return f"{n} {noun}"
    if plural_form is None:
        if noun.endswith(("s", "x", "ch", "sh")):
            plural_form = noun + "es"
        elif noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
            plural_form = noun[:-1] + "ies"
        else:
            plural_form = noun + "s"
    return f"{n} {plural_form}"


def log_error(message: str) -> None:
    """The line a run ends with ("error: ..."): also into the log file, when there is one."""
    if _file is not None:
        _file.handle(logging.LogRecord("sdtune", logging.ERROR, "", 0, message, None, None))


def setup_console(level: str | None = None, log_file: str | Path | None = None, simple: bool = False) -> None:
    """Apply --console_log_level / --console_log_file / --console_log_simple (see the module doc).
    An unwritable log file is a UserError before anything else happens."""
    global _file, _library_level, _root_level
    if level is not None and level not in LEVELS:
        raise UserError(f"unknown level {level!r}", where="--console_log_level", fix=f"Use one of {', '.join(LEVELS)}.")
    handler = _AppendFile(Path(log_file), "%(message)s" if simple else FILE_FORMAT) if log_file else None
    reset()
    number = getattr(logging, level) if level else logging.INFO
    _LOG.setLevel(number)
    if not (level or log_file or simple):
        quiet_libraries()
        return
    root = logging.getLogger()
    _root_level = root.level
    root.setLevel(number)
    if handler is not None:
        _file = handler
        targets = [(_LOG, handler), (root, handler)]
        _LOG.removeHandler(_DEFAULT)
    else:
        targets = [(root, _Terminal("stdout" if simple else "stderr"))]
    for logger, h in targets:
        logger.addHandler(h)
        _installed.append((logger, h))
    logging.captureWarnings(True)
    # the libraries' own notices stay off below ERROR (they repeat ours), except when debugging
    _library_level = logging.DEBUG if number == logging.DEBUG else max(number, logging.ERROR)
    quiet_libraries()


def reset() -> None:
    """Back to the default output (and the root logger's level before setup_console)."""
    global _file, _library_level, _root_level
    for logger, h in _installed:
        logger.removeHandler(h)
        h.close()
    _installed.clear()
    _file, _library_level = None, None
    if _DEFAULT not in _LOG.handlers:
        _LOG.addHandler(_DEFAULT)
    _LOG.setLevel(logging.INFO)
    if _root_level is not None:
        logging.getLogger().setLevel(_root_level)
        _root_level = None
    logging.captureWarnings(False)
    _route_libraries(propagate=False)


def quiet_libraries() -> None:
    """diffusers/transformers print their own progress bars and notices; ours are enough."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.disable_progress_bar()
        log.set_verbosity(_library_level or logging.ERROR)
    if _library_level is not None:
        _route_libraries(propagate=True)


def _route_libraries(*, propagate: bool) -> None:
    """transformers and diffusers print through handlers of their own; with the logging flags their
    lines go through the root logger instead, so they follow the level and reach the log file."""
    modules = [sys.modules.get(m) for m in ("transformers.utils.logging", "diffusers.utils.logging")]
    for log in filter(None, modules):
        if propagate:
            log.disable_default_handler()
            log.enable_propagation()
        else:
            log.enable_default_handler()
            log.disable_propagation()


_LOG.propagate = False
_DEFAULT = _Terminal("stdout")
_LOG.addHandler(_DEFAULT)
_LOG.setLevel(logging.INFO)


# ---------------------------------------------------------------- bitsandbytes only when asked for


def _bitsandbytes_off(import_utils: ModuleType) -> None:
    # diffusers decides once, when its import_utils module runs, whether bitsandbytes is installed,
    # and then imports it with every model for its 4-bit/8-bit loaders, which sdtune never uses. It
    # has no public switch, so this is the one place where sdtune sets its private flag; an 8-bit
    # optimizer imports bitsandbytes itself (quiet_import).
    import_utils._bitsandbytes_available = False


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` right after the module `name` is first executed."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the other finders locate the module as usual
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _ThenLoader(spec.loader, self.then)
                return spec
        return None


class _ThenLoader(importlib.abc.Loader):
    def __init__(self, loader, then):
        self._loader, self._then = loader, then

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._then(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


def keep_bitsandbytes_unloaded() -> None:
    """Keep diffusers from importing bitsandbytes with its models (see the module doc). Imports
    nothing: when diffusers is not loaded yet, the flag is set as it loads."""
    name = "diffusers.utils.import_utils"
    if name in sys.modules:
        _bitsandbytes_off(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, _bitsandbytes_off))


@contextlib.contextmanager
def quiet_import():
    """An import whose chatter is not for our users (bitsandbytes reports optional kernels it did not
    find): what it prints, logs or warns is dropped; an exception still comes out."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [logging.StreamHandler(out)]  # records end here, not in lastResort or a log file
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.handlers[:] = saved
