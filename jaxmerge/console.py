"""What the command line shows: the library logs (`logging.getLogger("jaxmerge...")`) and
never prints; `jaxmerge` and `python -m jaxmerge.experiments.*` show those records as plain
lines on stdout. A program embedding jaxmerge configures logging as it likes instead."""

from __future__ import annotations

import logging
import sys


class _ConsoleHandler(logging.StreamHandler):
    """The handler `log_to_console` installs (one, however often it is called)."""


def log_to_console(level: int = logging.INFO) -> None:
    """jaxmerge's records at `level` and above as plain lines on stdout, written as they come."""
    logger = logging.getLogger("jaxmerge")
    logger.setLevel(level)
    logger.propagate = False  # shown once, here, whatever a library configured on the root logger
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
