"""The saliency GRU (``reference/heads.py`` HighlightDetectionHead) as ONE custom op, for inference.

    h = gru_last_state(x, w_ih, w_hh, b_ih, b_hh, steps, backend="auto")      # (B, H) in x's dtype

x (B, L, D) fp32/bf16/fp16; nn.GRU weights (gate order r, z, n): w_ih (3H, D), w_hh (3H, H), b_ih, b_hh
(3H,); steps (B,) int64 with 1 <= steps[b] <= L. Returns the hidden state after steps[b] steps from h0 = 0,
i.e. ``nn.GRU(D, H, batch_first=True)(x)[0][b, steps[b] - 1]``. The math (PyTorch's GRU)::

    gi_t = x_t W_ih^T + b_ih                  (all L steps in ONE GEMM, before the recurrence)
    gh_t = h_{t-1} W_hh^T + b_hh              (split into r, z, n thirds)
    r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r * gh_n)
    h_t = (1 - z) * n + z * h_{t-1} = n + z * (h_{t-1} - n)    (frozen once t >= steps[b])

The whole thing is ``torch.ops.ld_detr.gru_last_state`` (``GRU_OP``), with a fake kernel, so
``torch.compile(fullgraph=True)``, ``torch.export`` and the ONNX exporter each see one node (like ``nn.GRU``
is one ``aten.gru`` node). The input projection lives *inside* the op as one GEMM: that is what lets the ONNX
translation (``kernels/gru_onnx.py``) emit one standard ``GRU`` node with the real W_ih — a recurrence-only op
would need a 3H x 3H identity as the GRU's input weight, a wasted GEMM three times the size of the real one.

Backends (``backend`` = "auto" | "triton" | "torch"; "auto" is Triton on CUDA, torch elsewhere, see
``kernels._utils.resolve_backend``):

* "torch" — a loop over the steps with the samples sorted by length, so the active ones are a prefix and a
  finished sample leaves it (no work past its length, no (B, L, H) output, no gather):
  ``gru_recurrence_torch``, the input GEMM in the input dtype and the state and gates in fp32, five ops per
  step into buffers allocated once (``addmm`` for W_hh with b_hh folded in — ``baddbmm`` over column
  blocks while one sample is active — sigmoid_, addcmul, tanh_, lerp).
  It beats aten's packed-sequence GRU (~20 dispatched ops per step) on CPU, and aten's half GRU would keep
  h and the gates in half precision.
* "triton" — ``kernels/gru_triton.py``: one persistent launch for all steps (W_hh split across programs,
  a grid barrier per step) on CUDA, or its interpreter-safe mode (one program per sample) under
  ``TRITON_INTERPRET=1``.

Numerics: the input GEMM runs in x's dtype (fp32 accumulation inside the BLAS); the state h, the W_hh
products and the gate math are fp32 whatever the input dtype; the result is cast to x's dtype.

Inference only: there is no backward. Calling it with grad mode on and an input that requires grad raises
``KernelInputError`` (run under ``torch.no_grad()`` / ``torch.inference_mode()``; training uses ``nn.GRU``).
"""

from __future__ import annotations

import bisect

import torch
from torch import Tensor

from ._utils import BACKENDS, KernelInputError, check_tensor, derived, resolve_backend
from .onednn import _eligible, linear, packed

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["GRU_OP", "gru_last_state", "gru_recurrence_torch", "input_projection", "onnx_translation_table"]


# --------------------------------------------------------------------------------------------------------
# input checks (shapes and dtypes only: trace-safe; the values of steps are checked inside the op)
# --------------------------------------------------------------------------------------------------------
def check_gru_inputs(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, steps: Tensor) -> None:
    """Raise KernelInputError (one line) unless the shapes, dtypes and devices fit together."""
    check_tensor("x", x, ndim=3, dtypes=DTYPES, contiguous=False)
    b, l, d = x.shape
    if l < 1:
        raise KernelInputError(f"x must have at least one step, got shape {tuple(x.shape)}")
    if not isinstance(w_hh, Tensor) or w_hh.dim() != 2 or w_hh.shape[0] != 3 * w_hh.shape[1]:
        shape = tuple(w_hh.shape) if isinstance(w_hh, Tensor) else type(w_hh).__name__
        raise KernelInputError(f"w_hh must be (3H, H) in nn.GRU's layout, got {shape}")
    h = w_hh.shape[1]
    for name, t, shape in (("w_ih", w_ih, (3 * h, d)), ("b_ih", b_ih, (3 * h,)), ("b_hh", b_hh, (3 * h,))):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise KernelInputError(f"{name} must have shape {shape} for x {tuple(x.shape)} and w_hh "
                                   f"{tuple(w_hh.shape)}, got {got}")
    for name, t in (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)):
        if t.dtype != x.dtype or t.device != x.device:
            raise KernelInputError(f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}: "
                                   "cast the weights to x's dtype and device")
    if not isinstance(steps, Tensor) or steps.dtype != torch.int64 or tuple(steps.shape) != (b,):
        got = f"{steps.dtype} {tuple(steps.shape)}" if isinstance(steps, Tensor) else type(steps).__name__
        raise KernelInputError(f"steps must be an int64 tensor of shape ({b},) (one length per sample), got {got}")
    if steps.device != x.device:
        raise KernelInputError(f"steps is on {steps.device}, x is on {x.device}")


def check_steps_values(steps: Tensor, length: int) -> list[int]:
    """steps (B,) -> its values as a list (a host sync on CUDA); KernelInputError names the first bad entry."""
    values = steps.tolist()
    for i, s in enumerate(values):
        if not 1 <= s <= length:
            raise KernelInputError(f"steps[{i}] = {s} is outside [1, {length}] (x has {length} steps)")
    return values


# --------------------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------------------
def input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor) -> Tensor:
    """gi = x W_ih^T + b_ih for all steps in one GEMM: x (B, L, D) -> (B, L, 3H) in x's dtype (on the CPU a
    oneDNN GEMM on W_ih packed once, :mod:`kernels.onednn`, where that applies; else one ``addmm``)."""
    b, l, d = x.shape
    return linear(x.reshape(b * l, d), w_ih, b_ih).view(b, l, -1)


def _segments(lengths: list[int]) -> list[tuple[int, int, int]]:
    """[(k, t0, t1)]: at steps t0 <= t < t1 (t >= 1) exactly the first k samples are active (lengths[b] > t),
    for lengths sorted descending."""
    neg = [-m for m in lengths]  # ascending, for bisect: k_t = #{b: lengths[b] > t} = bisect_left(neg, -t)
    out, t0 = [], 1
    while t0 < lengths[0]:
        k = bisect.bisect_left(neg, -t0)
        out.append((k, t0, lengths[k - 1]))  # all k stay active until the shortest of them ends
        t0 = lengths[k - 1]
    return out


def _w_t(w: Tensor) -> Tensor:  # (3H, H) -> W_hh^T (H, 3H) contiguous fp32: MKL's GEMM is faster on it than on a view
    return w.float().t().contiguous()


def _row_blocks(three_h: int) -> int:
    """How many column blocks the single-row W_hh product is split into: one per thread (a batched GEMV runs
    its blocks on separate threads: 10.6 vs 13.1 us for 2 vs 3 blocks on 2 threads, H = 256), 3 (the gates)
    where the thread count does not divide 3H or exceeds 8."""
    k = torch.get_num_threads()
    return k if k <= 8 and three_h % k == 0 else 3


def _w_blocks(w: Tensor, k: int) -> Tensor:
    """(3H, H) -> (k, H, 3H / k) contiguous fp32: block j = columns j*c..(j+1)*c of W_hh^T, so the k outputs of
    ``baddbmm`` laid end to end are the 3H-wide ``h W_hh^T``."""
    c = w.shape[0] // k
    return w.float().t().reshape(w.shape[1], k, c).transpose(0, 1).contiguous()


def _packed_hh(h: Tensor, w_hh: Tensor) -> Tensor | None:
    """W_hh oneDNN-packed in its own dtype for the product with the (k, H) fp32 state h, or None where that path
    does not apply (see :mod:`kernels.onednn`; then fp32 ``addmm``)."""
    return packed(w_hh) if _eligible(h if h.dtype == w_hh.dtype else h.to(w_hh.dtype), w_hh) else None


def gru_recurrence_torch(gi: Tensor, w_hh: Tensor, b_hh: Tensor, lengths: list[int]) -> Tensor:
    """The recurrence from h0 = 0 with torch ops. gi (B, L, 3H) with rows sorted by ``lengths`` descending
    (lengths[b] in [1, L]) -> fp32 (B, H): row b's state after lengths[b] steps.

    Five ops per step, all writing into buffers allocated once (``out=`` / in place), no per-step indexing:
    b_hh's r/z part is added to gi once, so ``addmm(D_t, h, W_hh^T)`` with ``D_t = [gi_rz + b_hh_rz | b_hh_n]``
    gives the r/z pre-activations and ``gh_n = h W_n^T + b_hh_n`` together; then ``sigmoid_``, ``addcmul``
    (gi_n + r * gh_n), ``tanh_`` and ``lerp`` (n + z (h - n)). The active samples at step t are a prefix
    (k_t = #{b: lengths[b] > t}); a finished sample's state leaves the prefix and is kept as it is. While a
    single sample is active (B = 1, or the longest one's tail) the W_hh product is one ``baddbmm`` over
    column blocks of W_hh^T, one per thread, instead of the ``addmm``: MKL's 1-row GEMM is 1.6x slower (17.3 vs
    10.6 us, 2 threads, H = 256). The
    re-laid-out W_hh copies are made once per weight (:func:`kernels._utils.derived`).
    """
    b, _, three_h = gi.shape
    hid = three_h // 3
    t_max = lengths[0]
    b_h = b_hh.float()
    # D (T, B, 3H) fp32, step-major (each step's rows contiguous): two writes, the cast riding in the add
    d = torch.empty(t_max, b, three_h, dtype=torch.float32, device=gi.device)
    torch.add(gi[:, :t_max, : 2 * hid].transpose(0, 1), b_h[: 2 * hid], out=d[..., : 2 * hid])
    d[..., 2 * hid:] = b_h[2 * hid:]
    gn = gi[:, :t_max, 2 * hid:]  # (B, T, H) in gi's dtype: addcmul reads it into its fp32 result
    # step 0 from h0 = 0: the pre-activations are D_0 itself
    rz = torch.sigmoid(d[0, :, : 2 * hid])
    n = torch.tanh_(torch.addcmul(gn[:, 0], rz[:, :hid], d[0, :, 2 * hid:]))
    h = torch.addcmul(n, rz[:, hid:], n, value=-1)  # (B, H): n + z * (0 - n)
    a = torch.empty_like(d[0])  # (B, 3H) per-step pre-activations [pre_r | pre_z | gh_n]
    done: list[Tensor] = []  # finished tails, shortest first
    addmm, baddbmm, addcmul, lerp = torch.addmm, torch.baddbmm, torch.addcmul, torch.lerp
    for k, t0, t1 in _segments(lengths):
        if k < h.shape[0]:  # samples k.. are done: keep their state, shrink every buffer to the active prefix
            done.append(h[k:])
            h = h[:k].clone()
        a_k, n_k = a[:k], n[:k]
        a_rz, a_r, a_z, a_n = a_k[:, : 2 * hid], a_k[:, :hid], a_k[:, hid: 2 * hid], a_k[:, 2 * hid:]
        gn_steps = gn[:k, t0:t1].unbind(1)  # per-step (k, H) views
        if k == 1:  # one row: W_hh^T's column blocks as one batched GEMV, (nb, 1, 3H / nb) views of a and d
            nb = _row_blocks(three_h)
            w_blocks = derived(w_hh, ("gru_w_blocks", nb), lambda w: _w_blocks(w, nb))
            a3, h3 = a_k.view(nb, 1, -1), h.expand(nb, 1, hid)
            for d_t, gn_t in zip(d[t0:t1, 0].view(t1 - t0, nb, 1, -1).unbind(0), gn_steps):
                baddbmm(d_t, h3, w_blocks, out=a3)
                a_rz.sigmoid_()
                addcmul(gn_t, a_r, a_n, out=n_k).tanh_()
                lerp(n_k, h, a_z, out=h)  # n + z * (h - n), in place
        elif (pk := _packed_hh(h, w_hh)) is not None:
            # several rows, on the CPU: oneDNN's GEMM on W_hh packed in its own dtype (fp32: 81 vs 109 us for
            # MKL's addmm at 32 rows; bf16: 48 us, h rounded to bf16 for the product only), then + D_t in fp32
            wdt = w_hh.dtype
            for d_t, gn_t in zip(d[t0:t1, :k].unbind(0), gn_steps):
                hh = h if wdt == h.dtype else h.to(wdt)
                torch.add(d_t, torch.ops.mkldnn._linear_pointwise(hh, pk, None, "none", [], ""), out=a_k)
                a_rz.sigmoid_()
                addcmul(gn_t, a_r, a_n, out=n_k).tanh_()
                lerp(n_k, h, a_z, out=h)
        else:
            w_t = derived(w_hh, "gru_w_t", _w_t)
            for d_t, gn_t in zip(d[t0:t1, :k].unbind(0), gn_steps):
                addmm(d_t, h, w_t, out=a_k)
                a_rz.sigmoid_()
                addcmul(gn_t, a_r, a_n, out=n_k).tanh_()
                lerp(n_k, h, a_z, out=h)
    done.append(h)
    return done[0] if len(done) == 1 else torch.cat(done[::-1])


def _gru_torch(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, steps: Tensor) -> Tensor:
    lengths = check_steps_values(steps, x.shape[1])
    t_max = max(lengths)
    x = x[:, :t_max]  # steps past every sample's length are never read
    order = None
    if min(lengths) != t_max:  # sort by length (descending) so the active samples are a prefix
        order = torch.argsort(steps, descending=True, stable=True)
        x = x.index_select(0, order)
        lengths = sorted(lengths, reverse=True)
    h = gru_recurrence_torch(input_projection(x, w_ih, b_ih), w_hh, b_hh, lengths)
    if order is not None:
        h = torch.empty_like(h).index_copy_(0, order, h)
    return h.to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# the custom op
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("ld_detr::gru_last_state", mutates_args=())
def _gru_op(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, steps: Tensor,
            backend: str) -> Tensor:
    """(B, L, D), nn.GRU weights, steps (B,) int64 -> (B, H) in x's dtype; see the module docstring."""
    if resolve_backend(backend, x.device) == "triton":
        from .gru_triton import gru_recurrence_triton

        return gru_recurrence_triton(input_projection(x, w_ih, b_ih), w_hh, b_hh, steps)
    return _gru_torch(x, w_ih, w_hh, b_ih, b_hh, steps)


@_gru_op.register_fake
def _(x, w_ih, w_hh, b_ih, b_hh, steps, backend):
    return x.new_empty((x.shape[0], w_hh.shape[1]))


GRU_OP = torch.ops.ld_detr.gru_last_state.default  # what graphs, op counts and the ONNX table refer to


def gru_last_state(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, steps: Tensor, *,
                   backend: str = "auto") -> Tensor:
    """The GRU state after steps[b] steps from h0 = 0: x (B, L, D) -> (B, H) in x's dtype (inference only).

    Weights in nn.GRU's layout and x's dtype/device; steps (B,) int64 in [1, L]. One custom-op call
    (``GRU_OP``); ``backend`` "auto" | "triton" | "torch" (see the module docstring).
    """
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_gru_inputs(x, w_ih, w_hh, b_ih, b_hh, steps)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_ih, w_hh, b_ih, b_hh)):
        raise KernelInputError("gru_last_state is inference-only (no backward): call it under torch.no_grad() "
                               "or torch.inference_mode(), or use nn.GRU to train")
    return GRU_OP(x, w_ih, w_hh, b_ih, b_hh, steps, backend)


def onnx_translation_table() -> dict:
    """{GRU_OP: onnxscript function} for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``:
    the op becomes one ONNX ``GRU`` node (``kernels/gru_onnx.py``)."""
    from .gru_onnx import gru_onnx

    return {GRU_OP: gru_onnx}
