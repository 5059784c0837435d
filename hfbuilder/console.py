"""Where the command's output goes: results to stdout, everything else to stderr.

Kept apart from the commands so that ``main()`` can run in-process (tests, notebooks)
and leave logging, warnings and file descriptors as it found them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from .hookspecs import hookimpl


def setup_logging(args: argparse.Namespace) -> Callable[[], None]:
    """Log hfbuilder's messages and Python warnings (``ctx.warn``) to stderr; return the undo.

    Only the ``hfbuilder`` and ``py.warnings`` loggers are touched, and restored afterwards,
    so ``main()`` can be called in-process (tests, notebooks) without leaking handlers.
    """
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hfbuilder: %(levelname)s: %(message)s"))
    loggers = [logging.getLogger("hfbuilder"), logging.getLogger("py.warnings")]
    saved = [(logger, logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    logging.captureWarnings(True)

    def restore() -> None:
        logging.captureWarnings(False)
        for logger, old_level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = propagate

    return restore


def quiet_libraries() -> None:
    """--quiet: silence transformers' and huggingface_hub's progress bars and chatter."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    disable_progress_bars()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever libraries print to stderr while a command works, so stdout holds only
    the result. fd-level: DeepSpeed's op builder and subprocesses print to fd 1 directly.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


class StageProgress:
    """A ``hfbuilder_run_stage`` wrapper, like any observing plugin: one tqdm step per stage."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    @hookimpl(wrapper=True)
    def hfbuilder_run_stage(self, stage: Any, ctx: Any) -> Any:
        self.bar.set_postfix_str(stage.name)
        try:
            return (yield)
        finally:
            self.bar.update(1)


__all__ = ["StageProgress", "print_json", "quiet_libraries", "setup_logging", "stdout_to_stderr"]
