"""pytest-benchmark: each Triton kernel against its torch baseline (``pytest bench/``).

GPU only: the Triton interpreter on CPU is a correctness tool, not something to time. Every row records
the device in ``extra_info`` and, for a Triton provider, its per-pair speed-up over the torch provider of the
same case (alternating, 30 pairs) for ``python -m bench.gate``; ``bench/gpu_kernels.py`` does the L2-flushed
``do_bench`` version of the same cases for the results files.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("Triton kernels are timed on a CUDA GPU only (the CPU interpreter is not a benchmark)",
                allow_module_level=True)

from bench.kernel_cases import conv_stack_case, queue_case  # noqa: E402
from bench.timing import alternate, device_kind  # noqa: E402

CONV_PROVIDERS = ("reference", "reference_bf16", "torch_folded", "triton_tf32", "triton_bf16")
QUEUE_PROVIDERS = ("similarity_torch", "similarity_triton_tf32", "loss_fwd_torch", "loss_fwd_triton_tf32",
                   "loss_fwdbwd_torch", "loss_fwdbwd_triton_tf32")


@functools.lru_cache(maxsize=None)
def _conv(batch):
    return conv_stack_case(batch, providers=CONV_PROVIDERS)


@functools.lru_cache(maxsize=None)
def _queue():
    return queue_case()


def _run(benchmark, case, provider, baseline):
    """Time ``provider``; alternate it with ``baseline`` for the per-pair speed-up that bench.gate checks."""
    fn = case.fns[provider]
    fn()

    def timed():
        fn()
        torch.cuda.synchronize()

    info = dict(device=torch.cuda.get_device_name(), device_kind=device_kind(), provider=provider, **case.meta)
    if provider != baseline:
        stats = alternate(case.fns[baseline], fn, pairs=30)
        info.update(baseline=baseline, speedup=1 / stats["ratio_median"], speedup_p10=1 / stats["ratio_p90"],
                    speedup_p90=1 / stats["ratio_p10"], candidate_median_ms=stats["candidate_median_s"] * 1e3,
                    reference_median_ms=stats["baseline_median_s"] * 1e3)
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, rounds=50, warmup_rounds=5, iterations=1)


@pytest.mark.parametrize("provider", CONV_PROVIDERS)
@pytest.mark.parametrize("batch", [1, 32, 256])
def test_conv_stack(benchmark, batch, provider):
    _run(benchmark, _conv(batch), provider, "reference")


@pytest.mark.parametrize("provider", QUEUE_PROVIDERS)
def test_queue(benchmark, provider):
    _run(benchmark, _queue(), provider, provider.split("_triton")[0] + ("" if provider.endswith("_torch") else "_torch"))
