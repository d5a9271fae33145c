"""Where xpconv's log messages go on a console.

xpconv's modules log to ``logging.getLogger("xpconv")`` (and its children, such as
``xpconv.training``) and install no handler of their own: an application decides.  This
module holds the handler the ``xpconv`` command installs (and the trainer falls back to,
see :class:`~xpconv.training.callbacks.EpochLine`): INFO lines, the run's report, go to
stdout as they are; DEBUG lines (``-v``) and warnings go to stderr as
``xpconv: debug: ...`` / ``xpconv: warning: ...``.  The streams are looked up when a line
is written, so a replaced ``sys.stdout`` (pytest's capture, a notebook) is honoured.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = ["LOGGER", "ConsoleHandler", "console_logging"]

#: the name of the logger every xpconv module logs under
LOGGER = "xpconv"


class ConsoleHandler(logging.Handler):
    """INFO to ``sys.stdout`` (the message only); other levels to ``sys.stderr`` with an
    ``xpconv: <level>:`` prefix.  Flushes after every line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno == logging.INFO:
                stream = sys.stdout
            else:
                stream = sys.stderr
                text = f"xpconv: {record.levelname.lower()}: {text}"
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: report through handleError
            self.handleError(record)


@contextlib.contextmanager
def console_logging(level: int = logging.INFO, *, propagate: bool | None = None) -> Iterator[logging.Logger]:
    """Send the ``xpconv`` logger's messages of ``level`` and above to the console while
    the block runs (a :class:`ConsoleHandler`); the logger's level, handlers and
    ``propagate`` are restored afterwards.  ``propagate=False`` keeps the messages from
    also reaching the root logger's handlers."""
    log = logging.getLogger(LOGGER)
    handler = ConsoleHandler()
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    if propagate is not None:
        log.propagate = propagate
    try:
        yield log
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate
