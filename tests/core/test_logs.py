"""Log lines: one per event, key=value with a UTC time (left to journald under systemd) or JSON."""

from __future__ import annotations

import json
import logging
import os
import re
import sys

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


def test_json_line_has_the_pairs_as_fields() -> None:
    entry = json.loads(JsonFormatter().format(record("event=spool_dropped seq=%d", 7)))
    assert re.fullmatch(AT, entry.pop("at"))
    assert entry == {"level": "warning", "logger": "edge_agent.serving.cascade", "event": "spool_dropped",
                     "seq": "7"}


def test_json_fields_unquote_what_repr_wrote_and_keep_spaces_of_plain_values() -> None:
    error = "it's \"down\"\tnow"
    entry = json.loads(JsonFormatter().format(record(
        "event=escalation_failed request_id=%s error=%r versions=%s path=%s", "r 1", error, [1, 2], "/a b")))
    assert (entry["event"], entry["request_id"], entry["error"], entry["versions"], entry["path"]) == (
        "escalation_failed", "r 1", error, "[1, 2]", "/a b")
    assert "msg" not in entry


def test_json_msg_for_free_text_and_for_pairs_that_would_shadow_the_entry() -> None:
    free = json.loads(JsonFormatter().format(record("Serving on port %d", 8001)))
    assert free["msg"] == "Serving on port 8001" and "event" not in free
    shadow = json.loads(JsonFormatter().format(record("event=x level=%s", "high")))
    assert (shadow["level"], shadow["msg"]) == ("warning", "event=x level=high") and "event" not in shadow


def test_json_keeps_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        event = logging.LogRecord("m", logging.ERROR, __file__, 1, "event=crashed step=%s", ("swap",),
                                  sys.exc_info())
    entry = json.loads(JsonFormatter().format(event))
    assert (entry["event"], entry["step"]) == ("crashed", "swap") and "ValueError: boom" in entry["exc"]
