"""Terminal output shared by the commands."""

from __future__ import annotations


def quiet_libraries() -> None:
    """diffusers/transformers print their own progress bars and notices; ours are enough."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.disable_progress_bar()
        log.set_verbosity_error()
