"""Structured logging: one line per event, ``key=value`` (the default) or JSON, fit for journald."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


def utc_time(record: logging.LogRecord) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``."""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object; the message keeps its ``key=value`` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"at": utc_time(record),
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def stderr_is_journal() -> bool:
    """True when stderr is systemd's journal stream: ``JOURNAL_STREAM`` names its device and inode
    (a child that inherited the variable but writes to a file does not match)."""
    try:
        dev, ino = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (dev, ino)


class KeyValueFormatter(logging.Formatter):
    """``at=… level=… logger=… <message>``; without ``at=`` under journald, which stamps each line."""

    def __init__(self) -> None:
        super().__init__("level=%(levelname)s logger=%(name)s %(message)s")
        self.stamp = not stderr_is_journal()

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"at={utc_time(record)} {line}" if self.stamp else line


def setup_logging(level: str = "INFO", fmt: str = "kv") -> None:
    """Configure the root logger once for a service's process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("grpc").setLevel(logging.WARNING)
