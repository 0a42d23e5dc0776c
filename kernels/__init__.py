"""Triton kernels for LD-DETR, each with a torch fallback, swapped into a reference model in place.

    import kernels
    model = kernels.apply(reference_model, backend="auto")   # "auto" | "triton" | "torch"

* ``conv_block`` — the Convolutional Blocks' residual block with BN folded, one launch per block
  (inference; training uses torch ops).
* ``queue_loss`` — Distill Align's soft-target cross-entropy against [momentum batch | queue], streaming the
  queue once (online log-sum-exp), with a recomputing backward; plus the plain queue similarity.
* ``onednn`` — CPU GEMMs on oneDNN-prepacked weights with ReLU / residual-add epilogues (no Triton: the fused
  inference model's linears and the GRU op's input projection on the CPU).
* ``gru_sequence`` — the highlight head's ``nn.GRU`` as one differentiable custom op while ``torch.compile``
  traces (no unrolled time loop, no recompile per length); eager calls stay ``nn.GRU``.

"auto" picks Triton for CUDA tensors and torch otherwise (decided per call, so ``model.to(device)`` after
``apply`` works); ``LDDETR_KERNELS=torch|triton`` overrides "auto". Forcing "triton" on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is imported: that is how CI checks the kernels without a GPU.
"""

from __future__ import annotations

from torch import nn

from ._utils import BACKENDS, ENV_BACKEND, PRECISIONS, KernelInputError, resolve_backend

__all__ = ["apply", "BACKENDS", "ENV_BACKEND", "KernelInputError", "resolve_backend"]


def apply(model: nn.Module, backend: str = "auto", precision: str = "auto") -> nn.Module:
    """Swap kernel-backed modules into ``model`` in place and return it.

    Parameters and buffers are untouched, so state_dicts and checkpoints are unchanged. ``precision`` sets
    the fp32 matmul mode of the kernels: "ieee" (parity), "tf32" (fast) or "auto" (follows
    ``torch.get_float32_matmul_precision()``). Calling ``apply`` again changes the backend.
    """
    from .modules import SWAPS

    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"kernel precision must be one of {PRECISIONS}, got {precision!r}")
    swapped = set(SWAPS.values())
    for module in model.modules():
        cls = type(module)
        if cls in SWAPS:
            module.__class__ = SWAPS[cls]
        if type(module) in swapped:
            module.kernel_backend = backend
            module.kernel_precision = precision
    return model
