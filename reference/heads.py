"""Prediction heads (paper §3.5 eqs. 32-38, spec §2.7).

* :class:`MomentRetrievalHead` — per decoder layer: ``logits = Linear_{d->2}(hs)`` (class 0 = foreground)
  and ``spans = sigmoid(MLP3(hs) + inverse_sigmoid(reference))`` in normalised (center, width).
* :class:`HighlightDetectionHead` — TR-DETR's "MR2HD": the top-1 predicted moment selects a slice of the
  unimodal video features V'; a GRU over that slice gives a global vector g; the saliency of clip i is
  ``sum_k saliency_proj(R_i * (1 + g·V'_i))_k / sqrt(d)`` with R the fused memory.

Departure from the official code (spec §7.2, §7.3), so a sample's outputs do not depend on its batch:
the official head converts the top-1 span to clip indices with the *padded* batch length L and runs its
GRU over the slice zero-padded to L. Here each sample uses its own length T_b: indices
``floor(xx * T_b)``, slice taken with Python slicing rules on the T_b valid clips (a negative start wraps
around, as in the official code), zero-padded to T_b, and the GRU state after step T_b is used. On an
unpadded batch (T_b = L) this is the official computation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .span_utils import inverse_sigmoid, span_cxw_to_xx


class MomentRetrievalHead(nn.Module):
    def __init__(self, hidden_dim: int = 256):
        super().__init__()
        d = hidden_dim
        self.class_embed = nn.Linear(d, 2)
        self.span_embed1 = nn.Linear(d, d)
        self.span_embed2 = nn.Linear(d, d)
        self.span_embed3 = nn.Linear(d, 2)

    def forward(self, hs: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
        """hs (n_layers, B, Q, d), references (n_layers, B, Q, 2) -> logits, spans (n_layers, B, Q, 2)."""
        logits = self.class_embed(hs)
        delta = self.span_embed3(self.span_embed2(self.span_embed1(hs).relu()).relu())
        spans = (delta + inverse_sigmoid(references)).sigmoid()
        return logits, spans


def top1_slice_bounds(pred_logits: Tensor, pred_spans: Tensor, lengths: Tensor, clip_length: float) -> tuple[Tensor, Tensor]:
    """Clip range [start, stop) of each sample's top-1 moment, after Python slicing rules on its length.

    pred_logits/pred_spans (B, Q, 2), lengths (B,) long -> start, stop (B,) long with 0 <= start, stop <= T_b.
    The official code computes ``s, e = floor(cxw_to_xx(span) * (T * clip_len) / clip_len)`` and slices
    ``V'[s : e + 1]``.
    """
    with torch.no_grad():
        best = pred_logits.softmax(-1)[..., 0].argmax(dim=1)  # (B,)
        span = pred_spans[torch.arange(pred_spans.shape[0], device=pred_spans.device), best]  # (B, 2)
        t = lengths.to(span.dtype)
        xx = span_cxw_to_xx(span) * (t * clip_length)[:, None] / clip_length  # (B, 2) in clips
        idx = torch.floor(xx).long()
        lengths = lengths.long()

        def py_index(i: Tensor) -> Tensor:  # Python slice-bound normalisation on a length-T sequence
            return torch.where(i < 0, (i + lengths).clamp_min(0), torch.minimum(i, lengths))

        start, stop = py_index(idx[:, 0]), py_index(idx[:, 1] + 1)
        return start, torch.maximum(stop, start)


class HighlightDetectionHead(nn.Module):
    def __init__(self, hidden_dim: int = 256, clip_length: float = 2.0):
        super().__init__()
        self.clip_length = clip_length
        self.gru = nn.GRU(hidden_dim, hidden_dim, num_layers=1, batch_first=True)
        self.saliency_proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, pred_logits: Tensor, pred_spans: Tensor, vid_feat: Tensor, memory: Tensor,
                lengths: Tensor) -> Tensor:
        """pred_logits/pred_spans (B, Q, 2) final layer, vid_feat V' (B, L, d), memory R (B, L, d),
        lengths (B,) valid clips per sample -> saliency (B, L) (entries past T_b are not meaningful)."""
        b, l, d = vid_feat.shape
        start, stop = top1_slice_bounds(pred_logits, pred_spans, lengths, self.clip_length)
        steps = torch.arange(l, device=vid_feat.device)  # (L,)
        src = (start[:, None] + steps[None, :]).clamp_max(l - 1)  # (B, L) gather positions
        keep = (steps[None, :] < (stop - start)[:, None]).to(vid_feat.dtype)  # (B, L)
        seq = torch.gather(vid_feat, 1, src[..., None].expand(b, l, d)) * keep[..., None]  # (B, L, d)
        out, _ = self.gru(seq)  # (B, L, d): GRU states after each step
        last = (lengths.long() - 1).clamp_min(0)
        g = out[torch.arange(b, device=out.device), last]  # (B, d): state after T_b steps
        w = (vid_feat * g[:, None, :]).sum(-1)  # (B, L) raw dot products
        m = memory * w[..., None] + memory  # R * (1 + w)
        return self.saliency_proj(m).sum(-1) / math.sqrt(d)


class PredictionHeads(nn.Module):
    """Container with the official child names."""

    def __init__(self, hidden_dim: int = 256, clip_length: float = 2.0):
        super().__init__()
        self.video_moment_retrieval_prediction_head = MomentRetrievalHead(hidden_dim)
        self.highlight_detection_prediction_head = HighlightDetectionHead(hidden_dim, clip_length)
