"""Log lines: one per event, key=value with a UTC time (left to journald under systemd) or JSON."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from edgecloud.logs import JsonFormatter, KeyValueFormatter

AT = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("edge_agent.serving.cascade", logging.WARNING, __file__, 1, message, args, None)


def test_key_value_line_with_and_without_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    event = record("event=escalation_failed request_id=%s error=%r", "r-1", "deadline")
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    line = KeyValueFormatter().format(event)
    assert re.fullmatch(rf"at={AT} level=WARNING logger=edge_agent.serving.cascade "
                        r"event=escalation_failed request_id=r-1 error='deadline'", line)
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")  # inherited, but stderr is something else
    assert KeyValueFormatter().format(event).startswith("at=")
    stderr = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{stderr.st_dev}:{stderr.st_ino}")  # stderr is the journal
    assert KeyValueFormatter().format(event).startswith("level=WARNING ")


def test_json_line() -> None:
    entry = json.loads(JsonFormatter().format(record("event=spool_dropped seq=%d", 7)))
    assert re.fullmatch(AT, entry["at"])
    assert (entry["level"], entry["logger"], entry["msg"]) == ("warning", "edge_agent.serving.cascade",
                                                             "event=spool_dropped seq=7")
