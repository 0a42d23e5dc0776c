"""The throughput-regression gate: speed-ups in a ``pytest bench/ --benchmark-json=F`` run against stored baselines.

    python -m pytest bench/ --benchmark-json=bench.json
    python -m bench.gate bench.json                  # compare with bench/baselines/<device kind>.json
    python -m bench.gate bench.json --update         # accept these numbers as the new baseline

Every benchmark in ``bench/test_engine.py`` and ``bench/test_kernels.py`` records ``speedup`` (reference /
candidate, the median of per-pair ratios measured alternating in one process) and ``device_kind`` in its
``extra_info``. A benchmark **regresses** when its speed-up falls below ``baseline * (1 - margin)`` (default
margin 0.2: on 2 shared CPU cores the p10-p90 spread of a ratio is about +-10 %). Ratios transfer between
runs on the same kind of device even when the machine is busier; absolute times do not, so they are only
compared (``--absolute``) against a baseline from the same device kind and reported, not failed, unless
``--absolute`` is given. Baselines live in ``bench/baselines/<device kind>.json`` (``cpu-2t``,
``NVIDIA_H100_80GB_HBM3``, ...). Exit status: 0 ok, 1 a regression, 2 bad input or (``--strict``) no baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BASELINES = Path(__file__).resolve().parent / "baselines"


class GateError(ValueError):
    """A results or baseline file that cannot be used."""


def load_results(path: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """{device_kind: {benchmark name: extra_info}} from a pytest-benchmark JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GateError(f"{path}: not a readable pytest-benchmark JSON file ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise GateError(f"{path}: no 'benchmarks' list (write it with pytest --benchmark-json={path})")
    out: dict[str, dict[str, dict]] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        if "speedup" not in info or "device_kind" not in info:
            continue  # a benchmark without a paired baseline: nothing to gate
        info = dict(info, median_s=(b.get("stats") or {}).get("median"))
        out.setdefault(info["device_kind"], {})[b["name"]] = info
    return out


def compare(results: dict[str, dict], baseline: dict, margin: float, absolute: bool = False) -> list[dict]:
    """One row per benchmark of ``results``: status "ok", "REGRESSED", "new" (no baseline) or "slower" (absolute)."""
    rows = []
    base = baseline.get("benchmarks", {})
    for name, info in sorted(results.items()):
        row = dict(name=name, speedup=info["speedup"], baseline=None, status="new")
        ref = base.get(name)
        if ref is not None:
            row["baseline"] = ref["speedup"]
            floor = ref["speedup"] * (1 - margin)
            row["status"] = "ok" if info["speedup"] >= floor else "REGRESSED"
            now_ms, base_ms = info.get("candidate_median_ms"), ref.get("candidate_median_ms")
            if now_ms and base_ms:
                row["time_ratio"] = now_ms / base_ms
                if absolute and row["status"] == "ok" and now_ms > base_ms * (1 + margin):
                    row["status"] = "slower"
        rows.append(row)
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).parent).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def update(kind: str, results: dict[str, dict], directory: Path, margin: float) -> Path:
    """Merge ``results`` into ``directory/<kind>.json`` (atomic write)."""
    path = directory / f"{kind}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    benchmarks = dict(old.get("benchmarks", {}))
    for name, info in results.items():
        benchmarks[name] = {k: info[k] for k in ("speedup", "speedup_p10", "speedup_p90", "candidate_median_ms",
                                                 "reference_median_ms", "device", "threads") if k in info}
    new = dict(device_kind=kind, commit=_commit(), date=dt.date.today().isoformat(), margin=margin,
               benchmarks=dict(sorted(benchmarks.items())))
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(new, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def format_rows(kind: str, rows: list[dict], margin: float) -> str:
    lines = [f"device kind {kind} (regression: speed-up below baseline x {1 - margin:.2f})",
             f"{'benchmark':<52} {'baseline':>9} {'now':>7}  status"]
    for r in rows:
        base = f"{r['baseline']:.2f}x" if r["baseline"] is not None else "-"
        lines.append(f"{r['name']:<52} {base:>9} {r['speedup']:>6.2f}x  {r['status']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="pytest --benchmark-json output")
    p.add_argument("--baselines", type=Path, default=BASELINES, help="directory of <device kind>.json baselines")
    p.add_argument("--margin", type=float, default=0.2, help="allowed relative drop of a speed-up (default 0.2)")
    p.add_argument("--absolute", action="store_true", help="also fail when the candidate's own time rose by > margin")
    p.add_argument("--update", action="store_true", help="write these results as the baseline")
    p.add_argument("--strict", action="store_true", help="exit 2 when a device kind has no baseline")
    args = p.parse_args(argv)
    if not 0 <= args.margin < 1:
        print(f"bench.gate: --margin must be in [0, 1), got {args.margin}", file=sys.stderr)
        return 2
    try:
        by_kind = load_results(args.results)
    except GateError as e:
        print(f"bench.gate: {e}", file=sys.stderr)
        return 2
    if not by_kind:
        print(f"bench.gate: {args.results} has no benchmark with a recorded speed-up (run pytest bench/ "
              f"without --benchmark-disable)", file=sys.stderr)
        return 2
    status = 0
    for kind, results in sorted(by_kind.items()):
        if args.update:
            path = update(kind, results, args.baselines, args.margin)
            print(f"baseline for {kind}: {path} ({len(results)} benchmarks)")
            continue
        path = args.baselines / f"{kind}.json"
        if not path.exists():
            print(f"no baseline for device kind {kind} in {args.baselines} (create it with --update)")
            status = max(status, 2 if args.strict else 0)
            continue
        try:
            baseline = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            print(f"bench.gate: {path}: not valid JSON ({e})", file=sys.stderr)
            return 2
        rows = compare(results, baseline, args.margin, args.absolute)
        print(format_rows(kind, rows, args.margin))
        if any(r["status"] in ("REGRESSED", "slower") for r in rows):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
