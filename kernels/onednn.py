"""GEMMs on the CPU with oneDNN-prepacked weights (the fused inference model's linears, the GRU op's input
projection).

At this model's sizes (10-2400 rows, 256-2818 wide) a plain bf16 ``F.linear`` on the CPU re-lays out the
weight for oneDNN's AMX/AVX-512 kernels on every call and is barely faster than fp32; with the weight
reordered once (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's ``freezing`` does) the same
GEMM is 1.5-3x faster, and a ReLU or a residual add rides in its epilogue. In fp32, oneDNN's prepacked GEMM
beats MKL's ``addmm`` by 10-45% once the weight is larger than 256 x 256 (2 threads, rows 10-2400, e.g.
75 x 2818 -> 256: 502 vs 655 us, 10 x 256 -> 1024: 42 vs 77 us) and loses at or below it (its fixed cost,
~16 us a call, is most of a 10 x 256 x 256 GEMM): fp32 weights up to ``FP32_MIN_PACKED`` elements take
MKL unless the GEMM has at least ``FP32_MIN_PACKED_WORK`` multiply-adds and both weight dims are >= 64
(256 x 256 at 75 rows: 68 vs 91 us; at 10 rows level; a 2 x 256 head at 2400 rows: 117 vs 76 us). Both are
IEEE fp32 (oneDNN honours ``torch.backends.mkldnn.matmul.fp32_precision``, "ieee" unless the user lowers it).
So, for a weight on the CPU under no-grad, outside ``torch.compile``/export tracing:

    linear(x, w, b, relu=False)   # relu(x @ w^T + b)           (F.linear otherwise; prelu=a: PReLU)
    addmm_t(bias, x, wt)          # x @ wt + bias, wt = W^T     (the conv blocks' (K, N) weights)
    linear_add(other, x, w, bias=None)  # other + x @ w^T (+ bias)  (the residuals; addmm otherwise)
    conv3(x, wt, bias, residual=None)   # relu(conv1d k=3 (+ residual)) as one oneDNN convolution (or None)

Each packed copy is made on first use and cached per weight tensor (keyed by identity and ``_version``, so
an in-place write or a new buffer after ``.to()`` re-packs; the entry goes when the tensor does; a weight
made under ``torch.inference_mode`` has no version counter and takes the plain path). Disable with
``set_packing(False)`` (or ``LDDETR_ONEDNN=0``); any failure to pack turns packing off with one warning.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import clear_derived, derived, derived_keys

PACK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP32_MIN_PACKED = 256 * 256  # fp32 weights with more elements than this take oneDNN (see above)
FP32_MIN_PACKED_WORK = 32 * 256 * 256  # ... smaller ones (both dims >= 64) from this many multiply-adds a call
_state = {"enabled": os.environ.get("LDDETR_ONEDNN", "1") not in ("0", ""), "checked": False}


_is_compiling = torch.compiler.is_compiling
_is_exporting = torch.compiler.is_exporting


def is_tracing() -> bool:
    """Inside torch.compile / torch.export tracing (the packed ops are eager-only)."""
    return _is_compiling() or _is_exporting()


def set_packing(enabled: bool) -> None:
    """Turn the prepacked oneDNN path on or off (process-wide; the default is on where oneDNN supports it)."""
    _state["enabled"], _state["checked"] = bool(enabled), False
    clear_derived("onednn")
    clear_derived("onednn_admit")


#: what a CPU needs for oneDNN's fast half-precision kernels (fp32 needs nothing)
FAST_KERNEL_ISA = {torch.bfloat16: "AVX512-BF16 or AMX", torch.float16: "AVX512-FP16 or AMX-FP16"}


def has_fast_kernels(dtype: torch.dtype) -> bool:
    """Whether this CPU has oneDNN kernels that make ``dtype`` GEMMs fast (fp32 always; half precision: see
    :data:`FAST_KERNEL_ISA`), whatever :func:`set_packing` says. Without them half precision on the CPU runs
    aten's slow reference loops: measured 5-12x slower than fp32 (fp16 on an AMD EPYC)."""
    if dtype == torch.float32:
        return True
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    fn = getattr(torch.ops.mkldnn, check, None)
    try:
        return bool(torch.backends.mkldnn.is_available() and fn is not None and fn())
    except Exception:  # a build whose check itself fails
        return False


def packing_enabled(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``dtype`` GEMMs take the prepacked path (on, oneDNN available and fast for it on this CPU)."""
    if not _state["enabled"]:
        return False
    if not _state["checked"]:
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        _state.update(checked=True, enabled=bool(ok), dtypes={d: ok and has_fast_kernels(d) for d in PACK_DTYPES})
    return _state["enabled"] and _state["dtypes"][dtype]


def _packed_for(x: Tensor, w: Tensor, kind, make) -> Tensor | None:
    """The packed copy of w (``make(w)``, cached per ``kind``, made on the first call that uses it) for the GEMM
    with x, or None where the plain path runs: tracing, x not w's dtype or not on the CPU, autograd recording, a
    weight that is not a 2-D float/bf16/fp16 CPU tensor or has no version counter (made under inference mode:
    an in-place write could not be seen), packing off or unsupported, or an fp32 GEMM too small to pay
    (:func:`_fp32_pays`). The checks on the weight alone are made once per weight (:func:`_admission`, a
    :func:`~kernels._utils.derived` entry): a wrapped GEMM costs ~2 us over the raw op instead of ~5."""
    if _is_compiling() or _is_exporting():  # first: dynamo cannot trace is_inference()
        return None
    entry = derived(w, ("onednn_admit", kind), _admission)
    if not entry[0] or x.dtype != w.dtype or not x.is_cpu:
        return None
    if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
        return None
    if entry[1] and not _fp32_pays(x, w):
        return None
    if entry[2] is None:
        entry[2] = _pack(w, kind, make)  # None if packing failed (then it is off, and the entries gone)
    return entry[2]


def _admission(w: Tensor) -> list:
    """[packable, whether the fp32 row count decides, the packed copy once made] for weight w."""
    ok = (not w.is_inference() and w.dtype in PACK_DTYPES and w.is_cpu and w.dim() == 2
          and packing_enabled(w.dtype))
    return [ok, ok and w.dtype == torch.float32 and w.numel() <= FP32_MIN_PACKED, None]


def _fp32_pays(x: Tensor, w: Tensor) -> bool:
    """Whether oneDNN's prepacked fp32 GEMM beats MKL's for x (..., K) and a (N, K) or (K, N) weight."""
    n = w.numel()
    if n > FP32_MIN_PACKED:
        return True
    return min(w.shape) >= 64 and x.numel() // max(x.shape[-1], 1) * n >= FP32_MIN_PACKED_WORK


def packed_ids() -> list[tuple[int, bool | str]]:
    """(id of the weight, kind) for every weight packed so far and still alive — kind False / True for a linear's
    weight (stored as W / as W^T), "conv3" for a conv kernel (introspection, tests)."""
    return [(i, tag[1]) for i, tag in derived_keys("onednn")]


def _reorder(w: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)


def _pack(w: Tensor, kind, make) -> Tensor | None:
    """``make(w)`` cached per weight (:func:`kernels._utils.derived`), or None if oneDNN cannot pack it (then
    packing is off for the process, with one warning)."""
    try:
        return derived(w, ("onednn", kind), make)
    except Exception as e:  # an unsupported dtype / build: plain GEMMs from now on
        warnings.warn(f"oneDNN weight packing unavailable ({type(e).__name__}: {e}); using plain GEMMs")
        _state["enabled"] = False
        clear_derived("onednn_admit")
        return None


def _reorder_t(w: Tensor) -> Tensor:
    return _reorder(w.t())


def packed(w: Tensor, transposed: bool = False) -> Tensor | None:
    """The oneDNN-reordered copy of W (``transposed``: of ``w.t()``, for weights stored as W^T), or None if
    packing failed (then it is off for the process)."""
    return _pack(w, transposed, _reorder_t if transposed else _reorder)


def packed_for(x: Tensor, w: Tensor, transposed: bool = False) -> Tensor | None:
    """:func:`packed` W for the GEMM with x where the packed path applies to them (see :func:`_packed_for`), else
    None."""
    return _packed_for(x, w, transposed, _reorder_t if transposed else _reorder)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, relu: bool = False,
           prelu: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)``, then ReLU (``relu``) or PReLU (``prelu``: its weight): x (..., K), w (N, K) ->
    (..., N). A one-parameter PReLU is oneDNN's ``leaky_relu`` epilogue (the same values: x if x > 0 else a x)."""
    p = packed_for(x, w)
    if p is not None:
        if prelu is not None and prelu.numel() == 1:  # its value read once (derived: no .item() per call)
            alpha = derived(prelu, ("prelu_alpha",), lambda t: t.item())
            return torch.ops.mkldnn._linear_pointwise(x, p, b, "leaky_relu", [alpha], "")
        y = torch.ops.mkldnn._linear_pointwise(x, p, b, "relu" if relu else "none", [], "")
        return y if prelu is None else F.prelu(y, prelu)
    y = F.linear(x, w, b)
    if prelu is not None:
        return F.prelu(y, prelu)
    return y.relu_() if relu else y


def addmm_t(bias: Tensor, x: Tensor, wt: Tensor, relu: bool = False) -> Tensor:
    """``addmm(bias, x, wt)`` (then ReLU) for a weight stored transposed: x (M, K), wt (K, N) -> (M, N)."""
    p = packed_for(x, wt, transposed=True)
    if p is not None:
        return torch.ops.mkldnn._linear_pointwise(x, p, bias, "relu" if relu else "none", [], "")
    y = torch.addmm(bias, x, wt)
    return y.relu_() if relu else y


def linear_add(other: Tensor, x: Tensor, w: Tensor, transposed: bool = False, bias: Tensor | None = None) -> Tensor:
    """``other + x @ w^T (+ bias)`` (``transposed``: w is stored as W^T) as one GEMM: prepacked with the add in
    its epilogue, or one ``addmm`` (+ the bias). x (..., K), other (..., N) of the output's shape (any strides),
    bias (N,) -> (..., N)."""
    p = packed_for(x, w, transposed)
    if p is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, p, bias, "add")
    k, n = x.shape[-1], other.shape[-1]
    y = torch.addmm(other.reshape(-1, n), x.reshape(-1, k), w if transposed else w.t())
    if bias is not None:
        y = y.add_(bias)
    return y.view(*x.shape[:-1], n)


def _conv3_weight(wt: Tensor) -> Tensor:
    """(3 C_in, C_out) GEMM matrix, row k C_in + c = W[o, c, k] -> the oneDNN-reordered (C_out, C_in, 1, 3) kernel."""
    c_in = wt.shape[0] // 3
    w4 = wt.view(3, c_in, wt.shape[1]).permute(2, 1, 0)[:, :, None, :].contiguous()
    return torch.ops.mkldnn._reorder_convolution_weight(w4, [0, 1], [1, 1], [1, 1], 1, None)


def conv3(x: Tensor, wt: Tensor, bias: Tensor, residual: Tensor | None = None) -> Tensor | None:
    """``relu(conv1d(x, W, bias, padding=1) (+ residual))`` over batch-first activations as ONE oneDNN
    convolution on the prepacked kernel (ReLU and the residual add in its epilogue), or None where the packed
    path does not apply (then the caller runs its GEMM). x (B, L, C_in), residual (B, L, C_out); the k=3
    weight stored as the (3 C_in, C_out) GEMM matrix over ``[x_{t-1} | x_t | x_{t+1}]`` (row k C_in + c =
    W[o, c, k]). (B, L, C) contiguous is (B, C, 1, L) channels-last, the layout oneDNN reads and writes
    without a copy, so this replaces the GEMM path's strided copy of the shifted inputs as well."""
    if residual is not None and x.shape[1] == 1:
        # a one-clip input: torch 2.11's oneDNN binary convolution fails there ("could not create a memory"); the
        # caller's GEMM computes it (2.13 runs it, the same values)
        return None
    w = _packed_for(x, wt, "conv3", _conv3_weight)
    if w is None:
        return None
    x4 = x.contiguous().transpose(1, 2)[:, :, None, :]  # (B, C_in, 1, L) channels-last view
    geometry = ([0, 1], [1, 1], [1, 1], 1)  # padding, stride, dilation, groups
    if residual is None:
        y = torch.ops.mkldnn._convolution_pointwise(x4, w, bias, *geometry, "relu", [], "")
    else:
        r4 = residual.contiguous().transpose(1, 2)[:, :, None, :]
        y = torch.ops.mkldnn._convolution_pointwise.binary(x4, r4, w, bias, *geometry, "add", None, "relu", [], "")
    return y[:, :, 0, :].transpose(1, 2)  # (B, L, C_out), contiguous
