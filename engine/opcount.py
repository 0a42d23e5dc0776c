"""Count the ops a forward dispatches — the same way for every model, so counts compare.

    from engine.opcount import count_ops
    report = count_ops(model, video, video_mask, text, text_mask)
    report.total, report.counts.most_common(10)

Rules (issue #12): under ``torch.inference_mode``; view ops (an aten op whose output aliases its input
without writing it: ``view``, ``transpose``, ``expand``, slicing, ``reshape``...) excluded — but an op that
may alias and returned new memory (``reshape`` or ``contiguous`` of a non-viewable tensor: a copy) counts; one op per
``nn.GRU`` call (whatever it decomposes to) and one per GRU custom-op call. In-place ops count. The steady
state is counted: ``fn`` runs once uncounted first, so one-time work of a first call (the fused model's
weight packing, a position table growing) is not counted as part of every forward.
Counting happens at the Python dispatch level (``TorchDispatchMode``), so a composite op such as
``aten.linear`` or ``aten.scaled_dot_product_attention`` is one op on both sides.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def is_view_op(func) -> bool:
    """True for ops whose outputs alias an input without writing it."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


@dataclass
class OpReport:
    counts: collections.Counter = field(default_factory=collections.Counter)
    views: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def table(self, top: int = 15) -> str:
        lines = [f"{self.total} non-view ops ({self.views} view ops not counted)"]
        lines += [f"  {n:5d}  {name}" for name, n in self.counts.most_common(top)]
        return "\n".join(lines)


class _Counter(TorchDispatchMode):
    def __init__(self, report: OpReport):
        super().__init__()
        self.report = report
        self.suppress = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.suppress:
            if is_view_op(func) and not _copied(args, out):
                self.report.views += 1
            else:
                self.report.counts[str(func.overloadpacket)] += 1
        return out


def _copied(args, out) -> bool:
    """An op that may alias (``reshape``, ``contiguous``, ...) but returned new memory: a copy, counted as an op."""
    if not (args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)):
        return False
    return out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()


def count_ops(fn: Callable, *args, **kwargs) -> OpReport:
    """Run ``fn(*args, **kwargs)`` under inference mode, once to warm up and once counting its non-view ops
    (see module doc)."""
    with torch.inference_mode():
        fn(*args, **kwargs)
    report = OpReport()
    mode = _Counter(report)
    hooks = []
    modules = fn.modules() if isinstance(fn, nn.Module) else ()
    for m in modules:
        if isinstance(m, nn.RNNBase):
            def pre(_m, _a):
                report.counts["nn.GRU call" if isinstance(_m, nn.GRU) else "nn.RNN call"] += 1
                mode.suppress += 1

            def post(_m, _a, _o):
                mode.suppress -= 1

            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode(), mode:
            fn(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return report
