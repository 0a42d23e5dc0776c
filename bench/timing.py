"""Interleaved timing on noisy machines: the variants run round-robin (ABAB... for two) in one process, and
the result is the median of each plus the median (and spread) of the per-round ratios."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_kind() -> str:
    """What absolute times may be compared across runs on: the GPU model, or "cpu-<threads>t"."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return f"cpu-{torch.get_num_threads()}t"


def _quantile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def round_robin(fns: dict[str, Callable[[], object]], rounds: int = 15, calls: int = 1, warmup: int = 2,
                baseline: str | None = None) -> dict[str, dict]:
    """Time every variant once per round, the starting variant rotating each round; seconds per call.

    Each timing is ``calls`` back-to-back calls between two device syncs, divided by ``calls`` (1: the
    latency a caller sees; more: the pipelined time per call). Returns per variant ``median_s``, ``p10_s``,
    ``p90_s``, ``times_s`` and, against ``baseline``, the per-round ``ratio_*`` (variant / baseline time)."""
    names = list(fns)
    if baseline is not None and baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for k in names[r % len(names):] + names[: r % len(names)]:
                fn = fns[k]
                _sync()
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                _sync()
                times[k].append((time.perf_counter() - t) / calls)
    finally:
        if gc_was:
            gc.enable()
    out = {}
    for k, ts in times.items():
        row = dict(median_s=statistics.median(ts), p10_s=_quantile(ts, 0.1), p90_s=_quantile(ts, 0.9), times_s=ts,
                   rounds=rounds, calls=calls)
        if baseline is not None:
            ratios = [y / x for x, y in zip(times[baseline], ts)]
            row.update(baseline=baseline, ratio_median=statistics.median(ratios), ratio_p10=_quantile(ratios, 0.1),
                       ratio_p90=_quantile(ratios, 0.9))
        out[k] = row
    return out


def alternate(baseline: Callable[[], object], candidate: Callable[[], object], pairs: int = 15,
              warmup: int = 2) -> dict:
    """Time ``pairs`` (baseline, candidate) pairs, alternating which runs first; seconds. ``ratio_*`` is
    candidate / baseline per pair."""
    res = round_robin({"baseline": baseline, "candidate": candidate}, rounds=pairs, warmup=warmup, baseline="baseline")
    c = res["candidate"]
    return dict(baseline_median_s=res["baseline"]["median_s"], candidate_median_s=c["median_s"],
                ratio_median=c["ratio_median"], ratio_p10=c["ratio_p10"], ratio_p90=c["ratio_p90"], pairs=pairs)
