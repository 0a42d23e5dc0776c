"""bench.gate: the throughput-regression check on pytest-benchmark JSON (ratios per device kind)."""

from __future__ import annotations

import json

from bench.gate import main


def _results(path, speedups: dict[str, float], kind: str = "cpu-2t", ms: float = 10.0):
    benchmarks = [{"name": name, "stats": {"median": ms / 1e3},
                   "extra_info": {"speedup": s, "device_kind": kind, "candidate_median_ms": ms}}
                  for name, s in speedups.items()]
    benchmarks.append({"name": "test_without_pair", "stats": {"median": 1.0}, "extra_info": {}})
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


def test_update_then_pass_then_regress(tmp_path, capsys):
    base = tmp_path / "baselines"
    good = _results(tmp_path / "a.json", {"test_inference[engine-B1]": 2.0, "test_inference[aoti-B1]": 1.5})
    assert main([str(good), "--baselines", str(base), "--update"]) == 0
    stored = json.loads((base / "cpu-2t.json").read_text())
    assert stored["benchmarks"]["test_inference[engine-B1]"]["speedup"] == 2.0
    assert "test_without_pair" not in stored["benchmarks"]

    same = _results(tmp_path / "b.json", {"test_inference[engine-B1]": 1.7, "test_inference[aoti-B1]": 1.5})
    assert main([str(same), "--baselines", str(base)]) == 0  # 1.7 >= 2.0 * 0.8
    worse = _results(tmp_path / "c.json", {"test_inference[engine-B1]": 1.5, "test_inference[aoti-B1]": 1.5})
    assert main([str(worse), "--baselines", str(base)]) == 1  # 1.5 < 1.6
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "test_inference[engine-B1]" in out
    assert main([str(worse), "--baselines", str(base), "--margin", "0.3"]) == 0


def test_absolute_times_only_against_the_same_device_kind(tmp_path, capsys):
    base = tmp_path / "baselines"
    assert main([str(_results(tmp_path / "a.json", {"t": 2.0}, ms=10.0)), "--baselines", str(base), "--update"]) == 0
    slow = _results(tmp_path / "b.json", {"t": 2.0}, ms=20.0)
    assert main([str(slow), "--baselines", str(base)]) == 0  # ratios only by default
    assert main([str(slow), "--baselines", str(base), "--absolute"]) == 1
    other = _results(tmp_path / "c.json", {"t": 0.5}, kind="NVIDIA_H100", ms=20.0)
    assert main([str(other), "--baselines", str(base)]) == 0  # no H100 baseline: nothing compared
    assert "no baseline for device kind NVIDIA_H100" in capsys.readouterr().out
    assert main([str(other), "--baselines", str(base), "--strict"]) == 2


def test_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main([str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert main([str(empty)]) == 2
    assert main([str(_results(tmp_path / "a.json", {"t": 1.0})), "--margin", "1.5"]) == 2
