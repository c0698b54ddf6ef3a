"""``edgecloud bench`` end to end with small counts: every figure measured and written, beside its
baseline (the figures themselves are machine-dependent and not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgecloud_tools import cli


def test_bench_writes_every_figure_beside_its_baseline(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    assert cli.main(["bench", "--repeats", "20", "--batch", "8", "--clients", "2", "--calls", "10",
                     "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert [b["model"] for b in result["backend"]] == ["edge INT8", "edge FP32", "cloud FP32"]
    for b in result["backend"]:
        assert b["size_bytes"] > 0 and b["throughput_rows_per_s"] > 0
        assert 0 < b["batch1"]["p50_ms"] <= b["batch1"]["p99_ms"]
    agent = result["agent"]
    assert agent["through_agent"]["p50_ms"] > 0 and agent["in_process"]["p50_ms"] > 0
    gateway = result["gateway"]
    assert gateway["rows_per_s_batched"] > 0 and gateway["rows_per_s_unbatched"] > 0
    table = capsys.readouterr().out
    assert "edge FP32" in table and "dynamic batching" in table


@pytest.mark.parametrize("flag", ["--repeats", "--batch", "--clients", "--calls"])
def test_bench_refuses_counts_below_one(flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", flag, "0"])
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
