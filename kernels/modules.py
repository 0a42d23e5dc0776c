"""Kernel-backed versions of reference modules, swapped in place by :func:`kernels.apply`.

Each class subclasses the reference module and keeps its parameters and buffers untouched (same names,
same state_dict); only ``forward`` (or one method of it) changes. The torch path is the reference
module's own code, so ``backend="torch"`` is exactly the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.conv_blocks import ConvolutionalBlocks
from reference.distill_align import DistillAlign

from ._utils import dot_precision, resolve_backend
from .gru_sequence import gru_sequence


def _is_exporting() -> bool:
    fn = getattr(torch.compiler, "is_exporting", None)
    return bool(fn and fn())


def _needs_grad(module: torch.nn.Module, *inputs: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in inputs) or any(p.requires_grad for p in module.parameters())


class TritonConvolutionalBlocks(ConvolutionalBlocks):
    """Conv blocks with the fused inference kernel (``kernels.conv_block``).

    The kernel runs in eval mode when no gradient is needed (``torch.no_grad()`` / ``inference_mode``), on
    BN-folded weights that are computed once and refolded only when a parameter or BN statistic changes.
    Under ``torch.compile`` the folded torch convolutions are traced instead (inductor fuses around them).
    Train mode, or eval with gradients, runs the reference torch ops (BN batch statistics; autograd).
    """

    kernel_backend: str = "auto"
    kernel_precision: str = "auto"
    fold_bn_torch: bool = False  # the engine sets it: the torch path also runs on BN-folded weights

    def forward(self, x: Tensor, vid_mask: Tensor) -> Tensor:
        """x (L, B, d) sequence-first, vid_mask (B, L) bool -> (L, B, d)."""
        if self.training or _needs_grad(self, x):
            return super().forward(x, vid_mask)
        from .conv_block import residual_block_stack, residual_block_torch

        mask = vid_mask if vid_mask.dtype == torch.bool else vid_mask != 0
        # under torch.compile / export the folded torch convolutions are traced and inductor fuses their
        # epilogues itself (a user Triton kernel inside a compiled graph is not worth the capture risk here)
        if torch.compiler.is_compiling() or resolve_backend(self.kernel_backend, x.device) == "torch":
            if not self.fold_bn_torch:
                return super().forward(x, vid_mask)
            for fb in self.folded(x.dtype, x.device):
                x = residual_block_torch(x, mask, fb)
            return x
        return residual_block_stack(x.contiguous(), mask.contiguous(), self.folded(x.dtype, x.device),
                                    seq_first=True, precision=self.kernel_precision)

    def folded(self, dtype: torch.dtype, device: torch.device) -> list:
        """BN-folded weights for the kernel, cached per (dtype, device) and tensor versions."""
        from .conv_block import fold_block

        if torch.compiler.is_compiling() or _is_exporting():  # traced (export / compile): fold in the graph
            return [fold_block(b, dtype, device) for b in self.blocks]
        tensors = list(self.parameters()) + list(self.buffers())
        key = (dtype, device, tuple(t._version for t in tensors), tuple(t.data_ptr() for t in tensors))
        cache = self.__dict__.setdefault("_folded_cache", {})
        if cache.get("key") != key:
            with torch.no_grad():
                cache["blocks"] = [fold_block(b, dtype, device) for b in self.blocks]
            cache["key"] = key
        return cache["blocks"]


class TritonDistillAlign(DistillAlign):
    """Distill Align whose loss_align streams each queue once through the fused Triton kernel
    (``kernels.queue_loss``); loss_sim, the temperature clamp and the enqueue stay the reference's.

    With ``precision="auto"`` on fp32 features at torch's default matmul precision ("highest", i.e. exact
    fp32), the torch path runs: the kernel's exact-fp32 ("ieee") dots measured 3.6x slower than torch's
    fp32 cuBLAS on an H200 (loss forward 2.10 ms vs 0.58 ms, ``bench/results`` run3), while its TF32 variant
    is 2.6x faster (0.23 ms). ``torch.set_float32_matmul_precision("high")`` (or bf16 autocast) selects the
    kernel; an explicit ``precision="ieee"`` forces it.
    """

    kernel_backend: str = "auto"
    kernel_precision: str = "auto"

    def _exact_fp32_is_slower(self, gv: Tensor) -> bool:
        return self.kernel_precision == "auto" and gv.dtype == torch.float32 and dot_precision("auto") == "ieee"

    def align_loss(self, gv: Tensor, gt: Tensor, gv_m: Tensor, gt_m: Tensor, alpha: float) -> Tensor:
        if resolve_backend(self.kernel_backend, gv.device) == "torch" or self._exact_fp32_is_slower(gv):
            return super().align_loss(gv, gt, gv_m, gt_m, alpha)
        from .queue_loss import distill_align_loss

        return distill_align_loss(gv, gt, gv_m, gt_m, self.txt_queue, self.vid_queue, self.temp, alpha,
                                  precision=self.kernel_precision, backend="triton")


class SequenceGRU(torch.nn.GRU):
    """The highlight head's ``nn.GRU`` as one opaque op while ``torch.compile`` traces (``kernels.gru_sequence``):
    one graph node of any length, forward and backward, instead of dynamo's unrolled time loop that
    specialises the graph on the batch's length. Eager calls, autocast, an initial state or any other GRU
    shape run ``nn.GRU.forward`` itself; the op calls the same ``torch._VF.gru``, so the numbers are equal."""

    def forward(self, input, hx=None):  # noqa: A002 (nn.GRU's signature)
        if (torch.compiler.is_compiling() and hx is None and self.batch_first and self.num_layers == 1
                and self.bias and not self.bidirectional and self.proj_size == 0 and torch.is_tensor(input)
                and input.dim() == 3 and not torch.is_autocast_enabled(input.device.type)):
            out = gru_sequence(input, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0)
            return out, out[:, -1].unsqueeze(0)
        return super().forward(input, hx)


SWAPS = {ConvolutionalBlocks: TritonConvolutionalBlocks, DistillAlign: TritonDistillAlign,
         torch.nn.GRU: SequenceGRU}
