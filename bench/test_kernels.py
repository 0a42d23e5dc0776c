"""pytest-benchmark: each Triton kernel against its torch baseline (``pytest bench/``).

The Triton providers are timed on a CUDA GPU only: the Triton interpreter on CPU is a correctness tool, not
something to time. The GRU's torch loop (its off-CUDA backend) is timed on CPU too, against what the reference
head does (nn.GRU + a gather). Every row records the device in ``extra_info`` and, for a candidate, its
per-pair speed-up over the baseline of the same case (alternating, 30 pairs) for ``python -m bench.gate``;
``bench/gpu_kernels.py`` does the L2-flushed ``do_bench`` version of the same cases for the results files.
``LDDETR_BENCH_SMOKE=1`` (CI) runs the CPU rows at a tiny size with 2 pairs.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

from bench.kernel_cases import conv_stack_case, gru_case, queue_case  # noqa: E402
from bench.timing import _sync, alternate, device_kind  # noqa: E402

CUDA = torch.cuda.is_available()
SMOKE = os.environ.get("LDDETR_BENCH_SMOKE", "0") not in ("", "0")
gpu_only = pytest.mark.skipif(not CUDA, reason="Triton kernels are timed on a CUDA GPU only "
                                               "(the CPU interpreter is not a benchmark)")

CONV_PROVIDERS = ("reference", "reference_bf16", "torch_folded", "triton_tf32", "triton_bf16")
GRU_PROVIDERS_CPU = ("nn_gru", "torch_loop", "nn_gru_bf16", "torch_loop_bf16")
GRU_PROVIDERS_GPU = ("nn_gru", "torch_loop", "triton", "nn_gru_bf16", "triton_bf16")
QUEUE_PROVIDERS = ("similarity_torch", "similarity_triton_tf32", "loss_fwd_torch", "loss_fwd_triton_tf32",
                   "loss_fwdbwd_torch", "loss_fwdbwd_triton_tf32")


@functools.lru_cache(maxsize=None)
def _conv(batch):
    return conv_stack_case(batch, providers=CONV_PROVIDERS)


@functools.lru_cache(maxsize=None)
def _queue():
    return queue_case()


@functools.lru_cache(maxsize=None)
def _gru(batch):
    device = "cuda" if CUDA else "cpu"
    if SMOKE:
        return gru_case(2, 12, 32, device=device, providers=GRU_PROVIDERS_CPU)
    return gru_case(batch, device=device, providers=GRU_PROVIDERS_GPU if CUDA else GRU_PROVIDERS_CPU)


def _run(benchmark, case, provider, baseline):
    """Time ``provider``; alternate it with ``baseline`` for the per-pair speed-up that bench.gate checks."""
    fn = case.fns[provider]
    fn()

    def timed():
        fn()
        _sync()

    device = torch.cuda.get_device_name() if CUDA else "cpu"
    info = dict(device=device, device_kind=device_kind(), provider=provider, **case.meta)
    if provider != baseline:
        stats = alternate(case.fns[baseline], fn, pairs=2 if SMOKE else 30)
        info.update(baseline=baseline, speedup=1 / stats["ratio_median"], speedup_p10=1 / stats["ratio_p90"],
                    speedup_p90=1 / stats["ratio_p10"], candidate_median_ms=stats["candidate_median_s"] * 1e3,
                    reference_median_ms=stats["baseline_median_s"] * 1e3)
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, rounds=3 if SMOKE else 50, warmup_rounds=1 if SMOKE else 5, iterations=1)


@gpu_only
@pytest.mark.parametrize("provider", CONV_PROVIDERS)
@pytest.mark.parametrize("batch", [1, 32, 256])
def test_conv_stack(benchmark, batch, provider):
    _run(benchmark, _conv(batch), provider, "reference")


@gpu_only
@pytest.mark.parametrize("provider", QUEUE_PROVIDERS)
def test_queue(benchmark, provider):
    _run(benchmark, _queue(), provider, provider.split("_triton")[0] + ("" if provider.endswith("_torch") else "_torch"))


@pytest.mark.parametrize("provider", GRU_PROVIDERS_GPU if CUDA else GRU_PROVIDERS_CPU)
@pytest.mark.parametrize("batch", [1] if SMOKE else [1, 32, 256] if CUDA else [1, 32])
def test_gru(benchmark, batch, provider):
    """The saliency GRU (L=75, d=256) against nn.GRU + gather in the same dtype (cuDNN on CUDA)."""
    _run(benchmark, _gru(batch), provider, "nn_gru_bf16" if provider.endswith("_bf16") else "nn_gru")
