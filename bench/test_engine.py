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

from bench.engine_cases import qvh_inputs, random_model, reference_forward, training_case
from bench.timing import alternate
from engine.inference import build
from reference import LDDETRConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMOKE = os.environ.get("LDDETR_BENCH_SMOKE", "0") not in ("", "0")


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


@pytest.mark.parametrize("batch", [1, 32])
def test_inference_engine_vs_reference(benchmark, batch):
    if DEVICE == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if SMOKE:
        cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=32, t_feat_dim=32, queue_length=64)
        batch = min(batch, 2)
    else:
        cfg = LDDETRConfig.preset("qvhighlights", queue_length=1024)
    model = random_model(cfg, DEVICE)
    eng = build(model, device=DEVICE)
    x = qvh_inputs(cfg, batch, t=12 if SMOKE else 75, n=6 if SMOKE else 20, device=DEVICE)
    reference = reference_forward(model, x)

    def engine():
        return eng(*x)

    stats = alternate(reference, engine, pairs=2 if SMOKE else 15)
    benchmark.extra_info.update(device=_device_name(), threads=torch.get_num_threads(), batch=batch, **stats)
    benchmark.pedantic(engine, rounds=5, iterations=1, warmup_rounds=1)
    if DEVICE == "cpu" and not SMOKE:
        assert stats["ratio_median"] <= 1.05, stats


def test_training_step_engine_vs_reference(benchmark):
    """A B=32 training step: engine.train's step (fused AdamW, kernels.apply, deferred read-back) against the
    plain eager loop (default AdamW, the loss read back and checked every step), alternating."""
    if DEVICE == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    batch_size, clips = (2, 12) if SMOKE else (32, 75)
    case = training_case(batch_size, clips, DEVICE, queue_length=64 if SMOKE else 65536)
    stats = alternate(case.reference_step, case.engine_step, pairs=2 if SMOKE else 15)
    benchmark.extra_info.update(device=_device_name(), threads=torch.get_num_threads(), batch=batch_size, **stats)
    benchmark.pedantic(case.engine_step, rounds=3, iterations=1, warmup_rounds=0)
