"""Shared helpers of the fused inference model: weight packing done once at build time.

Every fused module is built FROM a reference module's weights (``from_reference``), names the module it
replaces (``replaces``) and stores only derived tensors (packed / folded weights, constants) as buffers.
Packing arithmetic runs in float64 and is rounded to float32 once, so a folded product (e.g. two linears
with nothing between them) is as accurate as the reference's own two roundings.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.onednn import is_tracing, linear, linear_add


def f64(t: Tensor | None) -> Tensor | None:
    """A detached float64 copy (None stays None)."""
    return None if t is None else t.detach().to(torch.float64)


def wb(linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """(weight (out, in), bias (out,)) of an nn.Linear in float64 (zero bias if it has none)."""
    w = f64(linear.weight)
    b = f64(linear.bias) if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    return w, b


def mha_wb(mha: nn.MultiheadAttention) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """nn.MultiheadAttention's packed in-projection split into (Wq, Wk, Wv, bq, bk, bv), float64."""
    if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("fused attention supports nn.MultiheadAttention with a packed in-projection, no bias_k/v")
    w = f64(mha.in_proj_weight)
    b = f64(mha.in_proj_bias) if mha.in_proj_bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return (*w.chunk(3, 0), *b.chunk(3, 0))


def rows(*pairs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (W, b) pairs along the output dim: one GEMM computes all of them."""
    return torch.cat([w for w, _ in pairs], 0), torch.cat([b for _, b in pairs], 0)


def chain(outer: tuple[Tensor, Tensor], inner: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """outer(inner(x)) for two affine maps with nothing between them, as one affine map."""
    (wo, bo), (wi, bi) = outer, inner
    return wo @ wi, wo @ bi + bo


class FusedModule(nn.Module):
    """Base class: ``replaces`` names the reference module; buffers hold the derived weights."""

    replaces: str = ""

    def put(self, name: str, t: Tensor) -> None:
        """Register a derived tensor (rounded to float32 once) as a buffer."""
        self.register_buffer(name, t.detach().to(torch.float32).contiguous() if t.is_floating_point() else t)


def layer_norm(x: Tensor, ln: tuple[Tensor, Tensor], eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], eps)


def masked(x: Tensor, keep: Tensor) -> Tensor:
    """x with entries where ``keep`` is False set to the dtype's lowest finite value (as reference/v2t_extractor)."""
    return torch.where(keep, x, torch.finfo(x.dtype).min)


def heads(x: Tensor, h: int) -> Tensor:
    """(B, S, h * e) -> (B, h, S, e), a view."""
    b, s, _ = x.shape
    return x.view(b, s, h, -1).transpose(1, 2)


def residual(x: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """x + a @ w^T in one op, the bias already carried by x (see "bias shift" in engine.fused.model).

    x (B, S, n) (any strides that view as B S rows) or a constant (S, n) broadcast over the batch; a (B, S, k);
    w (n, k) -> (B, S, n). Also the decoder's affine maps with a per-query constant bias."""
    b, s, _ = a.shape
    if x.dim() == 2:  # a per-row constant: expanded over the batch (a view at B = 1, a small copy above)
        x = x.expand(b, s, x.shape[-1])
    # one addmm (not baddbmm over an expanded W^T, which bf16 copies every call), or the prepacked oneDNN GEMM
    return linear_add(x, a, w)


def merge_heads(x: Tensor) -> Tensor:
    """(B, h, S, e) -> (B, S, h * e)."""
    b, h, s, e = x.shape
    return x.transpose(1, 2).reshape(b, s, h * e)


# Attention. On CUDA one fused ``scaled_dot_product_attention`` kernel. On CPU, at this model's sizes (10-75
# queries, 32-75 keys, head dims 32/64), aten's flash-attention kernel has a high fixed cost: the plain
# ``baddbmm(mask bias, q, k^T) -> softmax -> bmm`` is 1.3-2.5x faster in fp32 (and 2-10x for the decoder's
# cross-attention, whose q/k and v head dims differ, in bf16; the encoders' 75 x 75 self-attention in bf16:
# 3.4 vs 4.8 ms at B=32, level at B=1), so that is what runs there. The masked
# keys get the dtype's lowest finite value added (their softmax weight is exactly 0, as with SDPA's bool mask).
Mask = tuple  # (keep4 (B, 1, 1, Lk) bool, bias (B * h, 1, Lk) additive or None): see :func:`attention_mask`


ATTENTION_SCHEDULES = ("auto", "sdpa", "bmm")
_schedule = ["auto"]


@contextlib.contextmanager
def attention_schedule(name: str):
    """Force one attention form inside the block: "sdpa" (what CUDA runs; op counts of the CUDA schedule are
    taken on CPU this way), "bmm", or "auto" (the default: bmm off CUDA, SDPA on CUDA)."""
    if name not in ATTENTION_SCHEDULES:
        raise ValueError(f"attention schedule must be one of {ATTENTION_SCHEDULES}, got {name!r}")
    old, _schedule[0] = _schedule[0], name
    try:
        yield
    finally:
        _schedule[0] = old


def use_bmm_attention(x: Tensor) -> bool:
    """The baddbmm/softmax/bmm form off CUDA, SDPA on CUDA (one fused kernel); see :func:`attention_schedule`."""
    if _schedule[0] != "auto":
        return _schedule[0] == "bmm"
    return x.device.type != "cuda"


def attention_mask(keep: Tensor, h: int, dtype: torch.dtype) -> Mask:
    """keep (B, Lk) bool, True = attend -> (keep4, bias): built once per forward for every layer reading it."""
    keep4 = keep[:, None, None, :]
    if not use_bmm_attention(keep):
        return keep4, None
    b, lk = keep.shape
    bias = torch.where(keep4, 0.0, torch.finfo(dtype).min)  # (B, 1, 1, Lk) float32
    if bias.dtype != dtype:
        bias = bias.to(dtype)
    return keep4, bias.expand(b, h, 1, lk).reshape(b * h, 1, lk)


_zeros: dict = {}


def _zero(x: Tensor) -> Tensor:
    """A 0-dim zero of x's dtype and device, made once (baddbmm's ignored input when beta = 0)."""
    if is_tracing():  # a traced constant, never a fake tensor left in the cache
        return torch.zeros((), dtype=x.dtype, device=x.device)
    key = (x.dtype, x.device)
    z = _zeros.get(key)
    if z is None:
        z = _zeros[key] = torch.zeros((), dtype=x.dtype, device=x.device)
    return z


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v per head: q (B, h, Lq, e), k (B, h, Lk, e), v (B, h, Lk, ev) (views in any
    layout; a (B, h, Lk, e)-contiguous k, read as a transposed view, makes the bmm copy-free) -> (B, Lq, h * ev)."""
    if not use_bmm_attention(q):
        keep4 = None if mask is None else mask[0]
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=keep4, scale=scale))
    b, h, lq, e = q.shape
    if _small_half(q, b * h):  # fp32 beats oneDNN's half bmm at a few heads (see _small_half)
        m32 = None if mask is None else (mask[0], mask[1].float())
        return attention(q.float(), k.float(), v.float(), m32, scale).to(q.dtype)
    lk = k.shape[2]
    qf, kt, vf = q.reshape(b * h, lq, e), k.reshape(b * h, lk, e).transpose(1, 2), v.reshape(b * h, lk, -1)
    if mask is None:  # beta = 0: the (cached 0-dim) input is ignored, the scale rides in alpha
        s = torch.baddbmm(_zero(qf), qf, kt, beta=0.0, alpha=scale)
    else:
        s = torch.baddbmm(mask[1], qf, kt, alpha=scale)  # (B h, Lq, Lk)
    return merge_heads(torch.bmm(_softmax(s), vf).view(b, h, lq, -1))


#: half-precision attention on the CPU runs in fp32 up to this many (batch x head) matrices. At 8 (B = 1, 8 heads)
#: each attention takes 0.52-0.81x the half time (the decoder's 10 x 10 self-attention 73 vs 140 us, the
#: encoders' 75 x 75 202 vs 248 us: oneDNN's half bmm has a ~18 us floor where MKL's fp32 one takes 4-7 us,
#: and aten's bf16 softmax over 75 keys is slow); the whole B = 1 bf16 forward 0.97x (60 alternating pairs).
#: At 16 the single attentions are level to 0.7x but the B = 2 forward is 1.01x, from 32 1.1-1.4x (2 threads).
HALF_ATTENTION_FP32_MAX_BATCH = 8


def _half_on_cpu(t: Tensor) -> bool:
    """An eager half-precision CPU tensor: where the attention's fp32 routes apply (tracing checked first, so a
    traced graph gets no shape guard from the size checks that follow)."""
    return not is_tracing() and t.dtype in (torch.bfloat16, torch.float16) and t.device.type == "cpu"


def _small_half(q: Tensor, nb: int) -> bool:
    return _half_on_cpu(q) and nb <= HALF_ATTENTION_FP32_MAX_BATCH


def _softmax(s: Tensor) -> Tensor:
    """softmax over the last dim. A half-precision one on the CPU whose length is not a multiple of aten's
    32-wide bf16 vectors runs through fp32 (aten computes it in fp32 either way; only the rounding of exp's
    input differs): 1.07 vs 1.64 ms for (256, 75, 75) bf16 on 2 threads, level at 32 keys; whole forward at B=32
    0.98x. Small ones (B = 1) keep the one op."""
    if _half_on_cpu(s) and s.shape[-1] % 32 and s.numel() >= 1 << 16:
        return torch.softmax(s.float(), -1).to(s.dtype)
    return torch.softmax(s, -1)
