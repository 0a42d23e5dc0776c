"""pytest-benchmark: the inference engine against the reference model in eager mode (``pytest bench/``).

Each test alternates reference and engine over >= 15 pairs in one process (``bench.timing.alternate``) and
records the medians and the per-pair ratio (engine / reference) in ``extra_info``; the benchmark row itself
times the engine. On CPU the engine must not be slower than the reference (ratio median <= 1.05).
Shapes: the QVHighlights preset, T = 75 clips, N = 20 query tokens. ``LDDETR_BENCH_SMOKE=1`` (what CI
runs, with ``--benchmark-disable``) shrinks the inputs and pairs so the file only checks that it still runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.timing import alternate
from engine.inference import build
from reference import LDDETR, LDDETRConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMOKE = os.environ.get("LDDETR_BENCH_SMOKE", "0") not in ("", "0")


def _inputs(cfg, b, t=75, n=20):
    video = torch.randn(b, t, cfg.v_feat_dim, device=DEVICE)
    text = torch.randn(b, n, cfg.t_feat_dim, device=DEVICE)
    vmask = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    vmask[1:, t - t // 10 - 1:] = False  # some padding
    tmask = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
    return video, vmask, text, tmask


@pytest.mark.parametrize("batch", [1, 32])
def test_inference_engine_vs_reference(benchmark, batch):
    if DEVICE == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if SMOKE:
        cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=32, t_feat_dim=32, queue_length=64)
        batch = min(batch, 2)
    else:
        cfg = LDDETRConfig.preset("qvhighlights", queue_length=1024)
    model = LDDETR(cfg).eval().to(DEVICE)
    eng = build(model, device=DEVICE)
    x = _inputs(cfg, batch, t=12 if SMOKE else 75, n=6 if SMOKE else 20)

    def reference():
        with torch.no_grad():
            return model(*x)

    def engine():
        return eng(*x)

    stats = alternate(reference, engine, pairs=2 if SMOKE else 15)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                                threads=torch.get_num_threads(), batch=batch, **stats)
    benchmark.pedantic(engine, rounds=5, iterations=1, warmup_rounds=1)
    if DEVICE == "cpu" and not SMOKE:
        assert stats["ratio_median"] <= 1.05, stats
