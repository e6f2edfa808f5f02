"""What every child process of the launcher does first."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys


def become_child(json_output: bool) -> None:
    """Own process group (a terminal's Ctrl-C reaches only the launcher, which then stops us in
    order), die if the launcher dies, and log like the launcher."""
    os.setpgrp()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    setup_logging(json_output)


def setup_logging(json_output: bool, level: str | None = None) -> None:
    level = level or os.environ.get("LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {
            "timestamp": self.formatTime(record), "level": record.levelname, "process": record.processName,
            "target": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
