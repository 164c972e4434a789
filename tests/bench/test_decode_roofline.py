"""bench.decode_roofline end to end on a tiny model (CPU here; the GPU run is bench/gpu_run.sh)."""
from __future__ import annotations

import json

from duet.bench import decode_roofline, report


def test_quick_run_writes_consistent_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS_ROOT", tmp_path / "recorded")
    monkeypatch.setattr(report, "RUNS_ROOT", tmp_path)
    decode_roofline.main(["--quick", "--device", "cpu"])
    assert not (tmp_path / "recorded").exists()  # not recorded without --record
    data = json.loads((tmp_path / "cpu" / "decode_roofline.json").read_text())
    rows = data["rows"]
    assert [r["batch"] for r in rows] == [1, 4]  # no CUDA graphs on CPU: one eager row per batch
    for r in rows:
        assert r["graphs"] is False
        assert 0 < r["forward_ms"] <= r["step_ms"]
        assert abs(r["host_ms"] - (r["step_ms"] - r["forward_ms"])) < 1e-9
        # The floor: weights once plus every sequence's KV once, at the copy bandwidth measured in this run.
        expected_ms = 1e3 * (r["weight_GB"] + r["kv_GB"]) * 1e9 / (data["meta"]["copy_GBps"] * 1e9)
        assert abs(r["roofline_ms"] - expected_ms) < 1e-6 * max(1.0, expected_ms)
    assert rows[1]["kv_GB"] == 4 * rows[0]["kv_GB"]
    assert (tmp_path / "cpu" / "decode_roofline.png").stat().st_size > 0
