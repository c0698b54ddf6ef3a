"""Structured logging: one line per event, ``key=value`` (the default) or JSON, fit for journald.

Code logs ``event=<name> key=value ...`` messages (values through ``%s``, ``%d`` or ``%r``); in JSON
each pair becomes a field of its own, so a log pipeline can filter on ``event`` or ``device`` without
parsing the message again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

_KEY = r"[A-Za-z_][\w.]*"
#: one ``key=value``: a value quoted as ``%r`` writes a string, else everything up to the next pair
_PAIR = re.compile(rf"""
    (?P<key>{_KEY})=
    (?: (?P<quoted> '(?:[^'\\]|\\.)*' | "(?:[^"\\]|\\.)*" ) (?=\s+{_KEY}=|\s*\Z)
      | (?P<bare> .*? ) (?=\s+{_KEY}=|\s*\Z) )""", re.DOTALL | re.VERBOSE)
_STARTS_WITH_PAIR = re.compile(rf"\s*{_KEY}=")
#: the escapes ``repr`` writes in a string
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)
_ESCAPED = {"n": "\n", "r": "\r", "t": "\t"}
#: the keys of a JSON entry that come from the record itself
ENTRY_KEYS = ("at", "level", "logger", "msg", "exc")


def utc_time(record: logging.LogRecord) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``."""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z"


def message_fields(message: str) -> dict[str, str] | None:
    """The ``key=value`` pairs of a message that starts with one, values as strings (a quoted one
    unquoted as ``%r`` wrote it); None for free text."""
    if not _STARTS_WITH_PAIR.match(message):
        return None
    fields = {}
    for pair in _PAIR.finditer(message):
        quoted = pair["quoted"]
        fields[pair["key"]] = _unquote(quoted) if quoted else pair["bare"]
    return fields


def _unquote(quoted: str) -> str:
    """The string that ``repr`` wrote as ``quoted``; never raises, whatever the text."""
    def char(escape: re.Match[str]) -> str:
        code = escape[1]
        return chr(int(code[1:], 16)) if len(code) > 1 else _ESCAPED.get(code, code)

    return _ESCAPE.sub(char, quoted[1:-1])


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object: its ``key=value`` pairs as fields, ``msg`` for free text (and
    for a message whose pairs would shadow one of :data:`ENTRY_KEYS`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, str] = {"at": utc_time(record), "level": record.levelname.lower(),
                                 "logger": record.name}
        fields = message_fields(message)
        if fields is None or any(key in fields for key in ENTRY_KEYS):
            entry["msg"] = message
        else:
            entry.update(fields)
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
