"""The ``nbollama`` logger, and why nothing from a background thread reaches a notebook cell.

In a kernel, stderr written on any thread shows up in whichever cell is
running at that moment, as a red box that has nothing to do with it. So
nbollama's own fallback handler prints only warnings raised on the caller's
thread (a cell's own thread), and only while the application has configured
no logging of its own. Records from nbollama's threads (the engine loop,
the monitor, background cells) still go to every handler the user sets up
(``logging.basicConfig(level="INFO")`` shows them all).
"""

from __future__ import annotations

import logging
import sys
import threading

__all__ = ["logger", "BACKGROUND_THREAD_PREFIX"]

#: Every thread nbollama starts is named with this prefix.
BACKGROUND_THREAD_PREFIX = "nbollama-"


class _CallerThreadHandler(logging.StreamHandler):
    """stderr for warnings from the caller's own thread, when the application configured no logging."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        thread_name = record.threadName  # None when logging.logThreads is off
        if (thread_name is not None and thread_name.startswith(BACKGROUND_THREAD_PREFIX)) or (
            threading.current_thread().name.startswith(BACKGROUND_THREAD_PREFIX)
        ):
            return
        if logging.getLogger().handlers:
            return  # the application set up logging: the record propagates to it
        self.stream = sys.stderr  # follow redirections (ipykernel replaces sys.stderr)
        super().emit(record)


logger = logging.getLogger("nbollama")
if not any(isinstance(h, _CallerThreadHandler) for h in logger.handlers):
    logger.addHandler(_CallerThreadHandler())
