"""GEMMs on the CPU with oneDNN-prepacked weights (the fused inference model's linears, the GRU op's input
projection).

At this model's sizes (10-2400 rows, 256-2818 wide) a plain bf16 ``F.linear`` on the CPU re-lays out the
weight for oneDNN's AMX/AVX-512 kernels on every call and is barely faster than fp32; with the weight
reordered once (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's ``freezing`` does) the same
GEMM is 1.5-3x faster, and a ReLU or a residual add rides in its epilogue. In fp32, oneDNN's prepacked GEMM
beats MKL's ``addmm`` by 10-45% once the weight is larger than 256 x 256 (2 threads, rows 10-2400, e.g.
75 x 2818 -> 256: 502 vs 655 us, 10 x 256 -> 1024: 42 vs 77 us) and loses at or below it (its fixed cost,
~16 us a call, is most of a 10 x 256 x 256 GEMM): fp32 weights up to ``FP32_MIN_PACKED`` elements take
MKL. Both are IEEE fp32 (oneDNN honours ``torch.backends.mkldnn.matmul.fp32_precision``, "ieee" unless the
user lowers it). So, for a weight on the CPU under no-grad, outside ``torch.compile``/export tracing:

    linear(x, w, b, relu=False)   # relu(x @ w^T + b)           (F.linear otherwise)
    addmm_t(bias, x, wt)          # x @ wt + bias, wt = W^T     (the conv blocks' (K, N) weights)
    linear_add(other, x, w, bias=None)  # other + x @ w^T (+ bias)  (the residuals; addmm otherwise)

Each packed copy is made on first use and cached per weight tensor (keyed by identity and ``_version``, so
an in-place write or a new buffer after ``.to()`` re-packs; the entry goes when the tensor does; a weight
made under ``torch.inference_mode`` has no version counter and takes the plain path). Disable with
``set_packing(False)`` (or ``LDDETR_ONEDNN=0``); any failure to pack turns packing off with one warning.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

PACK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP32_MIN_PACKED = 256 * 256  # fp32 weights with more elements than this take oneDNN (see above)
_cache: dict[tuple[int, bool], tuple[weakref.ref, int, Tensor]] = {}
_state = {"enabled": os.environ.get("LDDETR_ONEDNN", "1") not in ("0", ""), "checked": False}


def is_tracing() -> bool:
    """Inside torch.compile / torch.export tracing (the packed ops are eager-only)."""
    fn = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or bool(fn and fn())


def set_packing(enabled: bool) -> None:
    """Turn the prepacked oneDNN path on or off (process-wide; the default is on where oneDNN supports it)."""
    _state["enabled"], _state["checked"] = bool(enabled), False
    _cache.clear()


def _supported(dtype: torch.dtype) -> bool:
    """oneDNN has fast kernels for ``dtype`` on this CPU (bf16: AVX512-BF16/AMX, fp16: AVX512-FP16/AMX-FP16)."""
    if dtype == torch.float32:
        return True
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    fn = getattr(torch.ops.mkldnn, check, None)
    return bool(fn is not None and fn())


def packing_enabled(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``dtype`` GEMMs take the prepacked path (on, oneDNN available and fast for it on this CPU)."""
    if not _state["enabled"]:
        return False
    if not _state["checked"]:
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        _state.update(checked=True, enabled=bool(ok), dtypes={d: ok and _supported(d) for d in PACK_DTYPES})
    return _state["enabled"] and _state["dtypes"][dtype]


def _eligible(x: Tensor, w: Tensor) -> bool:
    if is_tracing():  # first: dynamo cannot trace is_inference()
        return False
    return (w.dtype in PACK_DTYPES and x.dtype == w.dtype
            and (w.dtype != torch.float32 or w.numel() > FP32_MIN_PACKED) and x.device.type == "cpu" and w.dim() == 2
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            and not w.is_inference()  # no version counter: an in-place write could not be seen
            and packing_enabled(w.dtype))


def packed(w: Tensor, transposed: bool = False) -> Tensor | None:
    """The oneDNN-reordered copy of W (``transposed``: of ``w.t()``, for weights stored as W^T), or None if
    packing failed (then it is off for the process)."""
    key = (id(w), transposed)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    try:
        p = torch.ops.mkldnn._reorder_linear_weight((w.t() if transposed else w).contiguous(), None)
    except Exception as e:  # an unsupported dtype / build: plain GEMMs from now on
        warnings.warn(f"oneDNN weight packing unavailable ({type(e).__name__}: {e}); using plain GEMMs")
        _state["enabled"] = False
        return None
    if hit is None:
        weakref.finalize(w, _cache.pop, key, None)
    _cache[key] = (weakref.ref(w), w._version, p)
    return p


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, relu: bool = False) -> Tensor:
    """``F.linear(x, w, b)`` (then ReLU): x (..., K), w (N, K) -> (..., N)."""
    if _eligible(x, w):
        p = packed(w)
        if p is not None:
            return torch.ops.mkldnn._linear_pointwise(x, p, b, "relu" if relu else "none", [], "")
    y = F.linear(x, w, b)
    return y.relu_() if relu else y


def addmm_t(bias: Tensor, x: Tensor, wt: Tensor, relu: bool = False) -> Tensor:
    """``addmm(bias, x, wt)`` (then ReLU) for a weight stored transposed: x (M, K), wt (K, N) -> (M, N)."""
    if _eligible(x, wt):
        p = packed(wt, transposed=True)
        if p is not None:
            return torch.ops.mkldnn._linear_pointwise(x, p, bias, "relu" if relu else "none", [], "")
    y = torch.addmm(bias, x, wt)
    return y.relu_() if relu else y


def linear_add(other: Tensor, x: Tensor, w: Tensor, transposed: bool = False, bias: Tensor | None = None) -> Tensor:
    """``other + x @ w^T (+ bias)`` (``transposed``: w is stored as W^T) as one GEMM: prepacked with the add in
    its epilogue, or one ``addmm`` (+ the bias). x (..., K), other (..., N) of the output's shape (any strides),
    bias (N,) -> (..., N)."""
    if _eligible(x, w):
        p = packed(w, transposed)
        if p is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, p, bias, "add")
    k, n = x.shape[-1], other.shape[-1]
    y = torch.addmm(other.reshape(-1, n), x.reshape(-1, k), w if transposed else w.t())
    if bias is not None:
        y = y.add_(bias)
    return y.view(*x.shape[:-1], n)
