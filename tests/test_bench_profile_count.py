"""bench.gpu's "kernels per forward": only device (CUDA) events are counted, not the aten ops that launched
them as well (the earlier count was ~2x too high)."""

from __future__ import annotations

from types import SimpleNamespace

from torch.autograd import DeviceType

from bench.gpu import device_kernels


def _ev(key, device_type, self_us, count=1):
    return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_us, count=count)


def test_device_kernels_counts_each_kernel_once():
    events = [
        _ev("aten::addmm", DeviceType.CPU, 12.0),  # the op: its self device time is its kernel's, again
        _ev("void gemm_kernel<...>", DeviceType.CUDA, 12.0),
        _ev("aten::add", DeviceType.CPU, 0.0),
        _ev("vectorized_elementwise_kernel", DeviceType.CUDA, 3.0, count=4),
        _ev("part::loop_decoder", DeviceType.CUDA, 15.0),  # a per-module range, not a kernel
    ]
    kernels = device_kernels(events)
    assert [e.key for e in kernels] == ["void gemm_kernel<...>", "vectorized_elementwise_kernel"]
    assert sum(e.count for e in kernels) == 5
