"""Fused prediction heads (replace ``reference.heads.MomentRetrievalHead`` / ``HighlightDetectionHead``).

* Moment retrieval: only the last decoder layer is read at inference (aux outputs are training-only);
  ``class_embed`` and ``span_embed1`` read the same input, so they are one GEMM.
* Highlight detection: the top-1 slice bounds with fewer ops than :func:`reference.heads.top1_slice_bounds`
  (same values: ``cxw -> xx`` as one exact 2x2 matmul, the ``* (T clip) / clip`` pair skipped when
  ``clip_length`` is a power of two, where it is exact); the GRU as one op
  (:func:`kernels.gru.gru_last_state`: a persistent Triton kernel on CUDA, a lean torch loop
  elsewhere; its weights are plain buffers, so the fused model holds no ``nn.GRU``); ``saliency_proj(R (1 + w)).sum(-1) / sqrt(d)`` is linear in R per clip, so it is
  ``r (1 + w) + c`` with ``r = R u``, ``u = 1^T W / sqrt(d)`` — ``R u`` comes from the decoder's memory GEMM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.heads import HighlightDetectionHead, MomentRetrievalHead

from kernels.onednn import linear
from .common import FusedModule, f64, rows, wb

from kernels.gru import gru_last_state  # the GRU as one custom op (a persistent Triton kernel on CUDA)


class FusedMomentRetrievalHead(FusedModule):
    """forward(hs (B, Q, d) last layer (+ ``input_shift``), ref (B, Q, 2) or (Q, 2) fp32, the last layer's input reference) ->
    (logits (B, Q, 2), spans (B, Q, 2) fp32)."""

    replaces = "reference.heads.MomentRetrievalHead"

    def __init__(self, head: MomentRetrievalHead, input_shift: Tensor | None = None):
        super().__init__()
        w, b = rows(wb(head.class_embed), wb(head.span_embed1))
        if input_shift is not None:  # hs arrives bias-shifted (engine.fused.decoder)
            b = b - w @ input_shift
        self.put("w1", w), self.put("b1", b)
        self.put("w2", wb(head.span_embed2)[0]), self.put("b2", wb(head.span_embed2)[1])
        self.put("w3", wb(head.span_embed3)[0]), self.put("b3", wb(head.span_embed3)[1])

    def forward(self, hs: Tensor, inv_ref: Tensor) -> tuple[Tensor, Tensor]:
        y = linear(hs, self.w1, self.b1)  # [logits | span hidden]
        s = linear(linear(y[..., 2:].relu(), self.w2, self.b2, relu=True), self.w3, self.b3)
        return y[..., :2], (s + inv_ref).sigmoid()  # fp32: a half s is promoted inside the add (exact)


def saliency_rows(head: HighlightDetectionHead) -> tuple[Tensor, Tensor]:
    """Two rows for the memory GEMM: [R u + c | R u] with u = 1^T W / sqrt(d), c = 1^T b / sqrt(d)."""
    w, b = wb(head.saliency_proj)
    s = math.sqrt(w.shape[1])
    u = w.sum(0) / s
    return torch.stack([u, u]), torch.stack([b.sum() / s, torch.zeros((), dtype=torch.float64)])


class FusedHighlightDetectionHead(FusedModule):
    """forward(logits, spans (B, Q, 2), vid V' (B, L, d), r2 (B, L, 2) = [R u + c | R u], lengths (B,)) ->
    saliency (B, L) (entries past a sample's length are not meaningful, as in the reference)."""

    replaces = "reference.heads.HighlightDetectionHead"
    kernel_backend: str = "auto"
    keep_fp32 = ("cxw_to_xx",)  # the slice bounds are computed in fp32

    def __init__(self, head: HighlightDetectionHead):
        super().__init__()
        self.clip_length = float(head.clip_length)
        m, e = math.frexp(self.clip_length)
        self.clip_is_pow2 = m == 0.5  # x * (t * c) / c == x * t exactly
        gru = head.gru
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            self.put(name, getattr(gru, name))
        self.put("cxw_to_xx", torch.tensor([[1.0, 1.0], [-0.5, 0.5]], dtype=torch.float64))
        self.put("start_stop", torch.tensor([0, 1]))

    def slice_bounds(self, logits: Tensor, spans: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The top-1 moment's clip range [start, stop) per sample (values of reference.heads.top1_slice_bounds)."""
        b = logits.shape[0]
        best = logits.softmax(-1, dtype=torch.float32)[..., 0].argmax(1)  # (B,) the cast inside the op
        span = torch.gather(spans.float(), 1, best[:, None, None].expand(b, 1, 2))[:, 0]  # (B, 2)
        t = lengths.to(torch.float32)[:, None]  # (B, 1)
        xx = span @ self.cxw_to_xx  # (B, 2): [c - w/2, c + w/2], exact
        xx = xx * t if self.clip_is_pow2 else xx * (t * self.clip_length) / self.clip_length
        idx = torch.floor(xx).long() + self.start_stop  # [start, end + 1]
        n = lengths.long()[:, None]
        idx = torch.where(idx < 0, (idx + n).clamp_min(0), torch.minimum(idx, n))  # Python slice bounds
        start, stop = idx.unbind(1)
        return start, torch.maximum(stop, start)

    def forward(self, logits: Tensor, spans: Tensor, vid: Tensor, r2: Tensor, lengths: Tensor) -> Tensor:
        b, l, d = vid.shape
        start, stop = self.slice_bounds(logits, spans, lengths)
        steps = torch.arange(l, device=vid.device)
        src = (start[:, None] + steps).clamp_max(l - 1)  # (B, L) gather positions
        keep = (steps < (stop - start)[:, None])[..., None]  # (B, L, 1)
        seq = torch.gather(vid, 1, src[..., None].expand(b, l, d)) * keep  # (B, L, d)
        g = self._gru(seq, lengths.clamp_min(1))  # (B, d): state after each sample's own length
        w = torch.matmul(vid, g[:, :, None])  # (B, L, 1) raw dot products
        return torch.addcmul(r2[..., 0:1], r2[..., 1:2], w)[..., 0]  # R u (1 + w) + c

    def _gru(self, seq: Tensor, steps: Tensor) -> Tensor:
        return gru_last_state(seq, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0, steps,
                              backend=self.kernel_backend)
