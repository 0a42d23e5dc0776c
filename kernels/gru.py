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
  blocks while one sample is active — sigmoid_, addcmul, sigmoid_, lerp: the loop carries (h + 1) / 2 with
  W_hh and b_hh rescaled once, so that tanh is a sigmoid, ~4x cheaper on the CPU; the op 0.93-0.97x). The
  input GEMM takes only the rows the loop reads that are not all zero (a zero row's projection is b_ih
  exactly; the saliency head's input is zero past each sample's top-1 window): the op 0.76-0.89x at B=32.
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
from .onednn import linear, packed_for

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
    """[(k, t0, t1)]: at steps t0 <= t < t1 (from t = 0) exactly the first k samples are active (lengths[b] > t),
    for lengths sorted descending (all >= 1)."""
    neg = [-m for m in lengths]  # ascending, for bisect: k_t = #{b: lengths[b] > t} = bisect_left(neg, -t)
    out, t0 = [], 0
    while t0 < lengths[0]:
        k = bisect.bisect_left(neg, -t0)
        out.append((k, t0, lengths[k - 1]))  # all k stay active until the shortest of them ends
        t0 = lengths[k - 1]
    return out


def _w_t(w: Tensor) -> Tensor:  # (3H, H) -> W^T (H, 3H) contiguous fp32: MKL's GEMM is faster on it than on a view
    return w.float().t().contiguous()


def _row_blocks(three_h: int) -> int:
    """How many column blocks the single-row W_hh product is split into: one per thread (a batched GEMV runs
    its blocks on separate threads: 10.6 vs 13.1 us for 2 vs 3 blocks on 2 threads, H = 256), 3 (the gates)
    where the thread count does not divide 3H or exceeds 8."""
    k = torch.get_num_threads()
    return k if k <= 8 and three_h % k == 0 else 3


def _w_blocks(w: Tensor, k: int) -> Tensor:
    """(3H, H) -> (k, H, 3H / k) contiguous fp32: block j = columns j*c..(j+1)*c of W^T, so the k outputs of
    ``baddbmm`` laid end to end are the 3H-wide ``h W^T``."""
    c = w.shape[0] // k
    return w.float().t().reshape(w.shape[1], k, c).transpose(0, 1).contiguous()


def _gate_scale(w: Tensor) -> Tensor:
    """(3H,) fp32 [2 .. 2 | 4 .. 4]: the sigmoid-form scaling of W_hh's r/z and n rows (see :func:`_sigmoid_form`)."""
    h = w.shape[0] // 3
    return torch.cat([w.new_full((2 * h,), 2.0, dtype=torch.float32), w.new_full((h,), 4.0, dtype=torch.float32)])


def _sigmoid_form(w_hh: Tensor, b_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W_hh and b_hh for the recurrence on s = (h + 1) / 2, where tanh becomes a sigmoid (see
    :func:`gru_recurrence_torch`): W' = [2 W_rz ; 4 W_n] (exact, in W_hh's dtype, made once per weight),
    b' = [b_rz - W_rz 1 ; 2 (b_n - W_n 1)] and c = W' 1 / 2 = [W_rz 1 ; 2 W_n 1] (fp32; the row sums taken in
    float64 once per weight), so ``s W'^T + b' = (s - 1/2) W'^T + b' + c``."""
    w2 = derived(w_hh, ("gru_sigmoid_w",), lambda w: (w.float() * _gate_scale(w)[:, None]).to(w.dtype))
    c = derived(w_hh, ("gru_sigmoid_c",), lambda w: (w.double().sum(1) * _gate_scale(w).double() * 0.5).float())
    scale = derived(w_hh, ("gru_bias_scale",), lambda w: _gate_scale(w) * 0.5)  # [1 | 2]
    return w2, torch.addcmul(-c, b_hh.float(), scale), c


def _packed_hh(h: Tensor, w_hh: Tensor) -> Tensor | None:
    """W_hh oneDNN-packed in its own dtype for the product with the (k, H) fp32 state h, or None where that path
    does not apply (see :mod:`kernels.onednn`; then fp32 ``addmm``)."""
    x = h if h.dtype == w_hh.dtype else h.new_empty(h.shape, dtype=w_hh.dtype)  # its dtype is all that is read
    return packed_for(x, w_hh)


def gru_recurrence_torch(gi: Tensor, w_hh: Tensor, b_hh: Tensor, lengths: list[int], *,
                         n_doubled: bool = False, step_major: bool = False) -> Tensor:
    """The recurrence from h0 = 0 with torch ops. gi (B, L, 3H) = ``input_projection(x, w_ih, b_ih)`` with rows
    sorted by ``lengths`` descending (lengths[b] in [1, L]) -> fp32 (B, H): row b's state after lengths[b]
    steps. ``n_doubled``: gi's n-third is already doubled (projected with :func:`_sigmoid_input`'s weights, as
    :func:`gru_last_state` does: no pass over gi); otherwise it is doubled here (one op). ``step_major``: gi is
    laid out (L, B, 3H) instead (as :func:`_read_rows_projection` makes it), so building the fp32 per-step
    terms reads it contiguously (a half-precision gi read transposed took 4.8x as long: 697 vs 145 us at B=32).

    Sigmoid form: the loop carries s = (h + 1) / 2 instead of h, so that ``n = tanh(u) = 2 sigmoid(2 u) - 1``
    needs no affine map: with W' and b' of :func:`_sigmoid_form` (and gi_n doubled), ``s W'^T + b'`` is
    [gh_r, gh_z, 2 gh_n], so ``sigmoid(2 gi_n + r * 2 gh_n)`` is (n + 1) / 2 and ``s' = lerp(that, s, z)``
    — the same update as h's. aten's tanh is ~4x slower per element than its sigmoid on the CPU (32 x 256
    fp32: 17 vs 4 us). s0 = 1/2; the result is 2 s - 1.

    Five ops per step, all writing into buffers allocated once (``out=`` / in place), no per-step indexing:
    b'_rz is added to gi once, so ``addmm(D_t, s, W'^T)`` with ``D_t = [gi_rz + b'_rz | b'_n]`` gives the r/z
    pre-activations and ``2 gh_n`` together; then ``sigmoid_``, ``addcmul`` (2 gi_n + r * 2 gh_n), ``sigmoid_``
    and ``lerp`` (n + z (s - n)). The active samples at step t are a prefix (k_t = #{b: lengths[b] > t}); a
    finished sample's state leaves the prefix and is kept as it is. While a single sample is active (B = 1,
    or the longest one's tail) the W' product is one ``baddbmm`` over column blocks of W'^T, one per thread,
    instead of the ``addmm``: MKL's 1-row GEMM is 1.6x slower (17.3 vs 10.6 us, 2 threads, H = 256). The
    re-laid-out weight copies are made once per weight (:func:`kernels._utils.derived`).
    """
    gi = gi if step_major else gi.transpose(0, 1)  # (L, B, 3H)
    _, b, three_h = gi.shape
    hid = three_h // 3
    t_max = lengths[0]
    w_hh, b_h, c = _sigmoid_form(w_hh, b_hh)
    # D (T, B, 3H) fp32, step-major (each step's rows contiguous): two writes, the cast riding in the add
    d = torch.empty(t_max, b, three_h, dtype=torch.float32, device=gi.device)
    torch.add(gi[:t_max, :, : 2 * hid], b_h[: 2 * hid], out=d[..., : 2 * hid])
    d[..., 2 * hid:] = b_h[2 * hid:]
    gn = gi[:t_max, :, 2 * hid:]  # (T, B, H) 2 gi_n, in fp32 (one cast here instead of one inside every addcmul)
    gn = gn.float() if n_doubled else gn.float() * 2  # .float(): a no-op for fp32 gi
    h = torch.full((b, hid), 0.5, dtype=torch.float32, device=gi.device)  # s0 = (0 + 1) / 2
    a = torch.empty_like(d[0])  # (B, 3H) per-step pre-activations [pre_r | pre_z | 2 gh_n]
    n = torch.empty_like(h)
    done: list[Tensor] = []  # finished tails, shortest first
    addmm, baddbmm, addcmul, lerp = torch.addmm, torch.baddbmm, torch.addcmul, torch.lerp
    for k, t0, t1 in _segments(lengths):
        if k < h.shape[0]:  # samples k.. are done: keep their state, shrink every buffer to the active prefix
            done.append(h[k:])
            h = h[:k].clone()
        a_k, n_k = a[:k], n[:k]
        a_rz, a_r, a_z, a_n = a_k[:, : 2 * hid], a_k[:, :hid], a_k[:, hid: 2 * hid], a_k[:, 2 * hid:]
        gn_steps = gn[t0:t1, :k].unbind(0)  # per-step (k, H) views
        if k == 1:  # one row: W'^T's column blocks as one batched GEMV, (nb, 1, 3H / nb) views of a and d
            nb = _row_blocks(three_h)
            w_blocks = derived(w_hh, ("gru_w_blocks", nb), lambda w: _w_blocks(w, nb))
            a3, h3 = a_k.view(nb, 1, -1), h.expand(nb, 1, hid)
            for d_t, gn_t in zip(d[t0:t1, 0].view(t1 - t0, nb, 1, -1).unbind(0), gn_steps):
                baddbmm(d_t, h3, w_blocks, out=a3)
                a_rz.sigmoid_()
                addcmul(gn_t, a_r, a_n, out=n_k).sigmoid_()
                lerp(n_k, h, a_z, out=h)  # n + z * (s - n), in place
        elif (pk := _packed_hh(h, w_hh)) is not None:
            # several rows, on the CPU: oneDNN's GEMM on W' packed in its own dtype (fp32: 81 vs 109 us for
            # MKL's addmm at 32 rows; bf16: 48 us), then + D_t in fp32. In half precision the product reads
            # s - 1/2 = h / 2 rounded (as fine near h = 0 as h itself; s rounded would lose small states), one
            # op that replaces the cast, and the segment's D carries + c instead (one op per segment)
            wdt = w_hh.dtype
            half = wdt != h.dtype
            hh = torch.empty(k, hid, dtype=wdt, device=h.device) if half else h
            for d_t, gn_t in zip((d[t0:t1, :k] + c if half else d[t0:t1, :k]).unbind(0), gn_steps):
                if half:
                    torch.sub(h, 0.5, out=hh)
                torch.add(d_t, torch.ops.mkldnn._linear_pointwise(hh, pk, None, "none", [], ""), out=a_k)
                a_rz.sigmoid_()
                addcmul(gn_t, a_r, a_n, out=n_k).sigmoid_()
                lerp(n_k, h, a_z, out=h)
        else:
            w_t = derived(w_hh, "gru_w_t", _w_t)
            for d_t, gn_t in zip(d[t0:t1, :k].unbind(0), gn_steps):
                addmm(d_t, h, w_t, out=a_k)
                a_rz.sigmoid_()
                addcmul(gn_t, a_r, a_n, out=n_k).sigmoid_()
                lerp(n_k, h, a_z, out=h)
    done.append(h)
    s = done[0] if len(done) == 1 else torch.cat(done[::-1])
    return s.mul_(2.0).sub_(1.0)  # h = 2 s - 1


def _sigmoid_input(w_ih: Tensor, b_ih: Tensor) -> tuple[Tensor, Tensor]:
    """W_ih and b_ih with the n rows doubled (exact in any dtype), for :func:`gru_recurrence_torch`'s 2 gi_n."""
    def double_n(t: Tensor) -> Tensor:
        h = t.shape[0] // 3
        return torch.cat([t[: 2 * h], t[2 * h:] * 2])

    return derived(w_ih, ("gru_sigmoid_ih",), double_n), derived(b_ih, ("gru_sigmoid_ih",), double_n)


#: the GEMM takes only the rows that matter when they are at most this fraction of x's rows (see below)
SPARSE_ROWS_MAX_FRACTION = 0.75


def _read_rows_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor, lengths: list[int]) -> Tensor:
    """``input_projection(x, w_ih, b_ih)`` laid out step-major, (T, B, 3H), where only the rows the recurrence
    reads (t < lengths[b]) and that are not all zero go through the GEMM: a zero row's projection is b_ih
    exactly, and the saliency head's input is zero past each sample's top-1 window (in the benchmark's model
    ~70 % of the B=32 rows). Falls back to the one full GEMM when more than ``SPARSE_ROWS_MAX_FRACTION`` of the
    rows are needed."""
    b, t, d = x.shape
    need = x.abs().amax(-1) != 0  # (B, T); NaN rows count as needed (4-9x faster than (x != 0).any(-1))
    if min(lengths) < t:
        need &= torch.arange(t, device=x.device) < torch.tensor(lengths, device=x.device)[:, None]
    rows = need.t().reshape(-1).nonzero().squeeze(1)  # step-major row ids t * B + b
    if rows.numel() > SPARSE_ROWS_MAX_FRACTION * b * t:
        return input_projection(x.transpose(0, 1), w_ih, b_ih)  # one copy of x (D wide, not 3H)
    gi = b_ih.expand(t * b, b_ih.shape[0]).clone()
    if rows.numel():
        src = rows % b * t + rows // b  # the same rows in x's (B, T) order
        gi.index_copy_(0, rows, linear(x.reshape(b * t, d).index_select(0, src), w_ih, b_ih))
    return gi.view(t, b, -1)


def _gru_torch(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, steps: Tensor) -> Tensor:
    lengths = check_steps_values(steps, x.shape[1])
    t_max = max(lengths)
    x = x[:, :t_max]  # steps past every sample's length are never read
    order = None
    if min(lengths) != t_max:  # sort by length (descending) so the active samples are a prefix
        order = torch.argsort(steps, descending=True, stable=True)
        x = x.index_select(0, order)
        lengths = sorted(lengths, reverse=True)
    h = gru_recurrence_torch(_read_rows_projection(x, *_sigmoid_input(w_ih, b_ih), lengths), w_hh, b_hh, lengths,
                             n_doubled=True, step_major=True)
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
