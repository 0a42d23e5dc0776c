"""Interleaved timing on noisy machines: baseline and candidate alternate (ABAB...) in one process, and
the result is the median of each plus the median (and spread) of the per-pair ratios."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alternate(baseline: Callable[[], object], candidate: Callable[[], object], pairs: int = 15,
              warmup: int = 2) -> dict:
    """Time ``pairs`` (baseline, candidate) pairs, alternating which runs first; seconds."""
    for _ in range(warmup):
        baseline(), candidate()
    gc_was = gc.isenabled()
    gc.disable()
    a, b = [], []
    try:
        for i in range(pairs):
            for fn, out in ((baseline, a), (candidate, b)) if i % 2 == 0 else ((candidate, b), (baseline, a)):
                _sync()
                t = time.perf_counter()
                fn()
                _sync()
                out.append(time.perf_counter() - t)
    finally:
        if gc_was:
            gc.enable()
    ratios = sorted(y / x for x, y in zip(a, b))  # candidate / baseline per pair
    q = lambda p: ratios[min(len(ratios) - 1, int(p * len(ratios)))]  # noqa: E731
    return dict(baseline_median_s=statistics.median(a), candidate_median_s=statistics.median(b),
                ratio_median=statistics.median(ratios), ratio_p10=q(0.1), ratio_p90=q(0.9), pairs=pairs)
