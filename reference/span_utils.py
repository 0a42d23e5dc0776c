"""Pure 1-D span math: format conversion, temporal IoU / gIoU, inverse sigmoid.

Spec: ``ld-detr-code.md`` §2.6 (``inverse_sigmoid``), §2.7 (spans are normalised (center, width), "cxw"),
§3 (the matcher and the span losses use gIoU on (start, end), "xx"). This is the 1-D counterpart of detr's
``util/box_ops.py`` (Moment-DETR ``span_utils.py``).

Departures from the official code:

* Bad shapes raise ``ValueError`` instead of tripping an ``assert``.
* ``generalized_temporal_iou`` does not check ``end >= start`` (the official code asserts it, which forces a
  host sync on every call). Spans coming from ``span_cxw_to_xx`` with a non-negative width always satisfy it.
* Like the official code, two zero-length spans have union 0 and give NaN; no epsilon is added.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_last_dim(spans: Tensor, name: str = "spans") -> None:
    if spans.dim() < 1 or spans.shape[-1] != 2:
        raise ValueError(f"{name} must have last dim 2, got shape {tuple(spans.shape)}")


def _check_pairwise(spans: Tensor, name: str) -> None:
    if spans.dim() != 2 or spans.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {tuple(spans.shape)}")


def span_cxw_to_xx(spans: Tensor) -> Tensor:
    """(center, width) -> (start, end). ``spans``: (..., 2); returns (..., 2)."""
    _check_last_dim(spans)
    c, w = spans.unbind(-1)
    return torch.stack([c - 0.5 * w, c + 0.5 * w], dim=-1)


def span_xx_to_cxw(spans: Tensor) -> Tensor:
    """(start, end) -> (center, width). ``spans``: (..., 2); returns (..., 2)."""
    _check_last_dim(spans)
    s, e = spans.unbind(-1)
    return torch.stack([0.5 * (s + e), e - s], dim=-1)


def temporal_iou(spans1: Tensor, spans2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise 1-D IoU of spans in (start, end) format.

    Args:
        spans1: (N, 2) xx.
        spans2: (M, 2) xx.
    Returns:
        iou: (N, M) = inter / union, union: (N, M) = len1 + len2 - inter.
    """
    _check_pairwise(spans1, "spans1")
    _check_pairwise(spans2, "spans2")
    len1 = spans1[:, 1] - spans1[:, 0]  # (N,)
    len2 = spans2[:, 1] - spans2[:, 0]  # (M,)
    left = torch.max(spans1[:, None, 0], spans2[None, :, 0])  # (N, M)
    right = torch.min(spans1[:, None, 1], spans2[None, :, 1])  # (N, M)
    inter = (right - left).clamp(min=0)
    union = len1[:, None] + len2[None, :] - inter
    return inter / union, union


def generalized_temporal_iou(spans1: Tensor, spans2: Tensor) -> Tensor:
    """Pairwise 1-D generalized IoU (Rezatofighi et al. 2019) of spans in (start, end) format.

    ``giou = iou - (enclosing - union) / enclosing``, where ``enclosing`` is the length of the smallest
    span covering both. Range [-1, 1]; ``giou <= iou``.

    Args:
        spans1: (N, 2) xx.
        spans2: (M, 2) xx.
    Returns:
        (N, M) gIoU.
    """
    iou, union = temporal_iou(spans1, spans2)
    left = torch.min(spans1[:, None, 0], spans2[None, :, 0])  # (N, M)
    right = torch.max(spans1[:, None, 1], spans2[None, :, 1])  # (N, M)
    enclosing = (right - left).clamp(min=0)
    return iou - (enclosing - union) / enclosing


def paired_generalized_temporal_iou(spans1: Tensor, spans2: Tensor, abs_center_diff: Tensor | None = None) -> Tensor:
    """Element-wise gIoU of (center, width) spans that broadcast against each other: (..., 2) x (..., 2) -> (...).

    The value of :func:`generalized_temporal_iou` on ``span_cxw_to_xx`` of each pair (to float rounding), for
    matched pairs or any broadcast grid (the padded matcher's (S, B, Q, 1, 2) x (B, 1, W, 2)), in fewer ops.
    For widths w1, w2 >= 0 and centre distance d = |c1 - c2| the signed overlap
    ``min(e1, e2) - max(s1, s2) = min(e1 - s1, e2 - s2, e1 - s2, e2 - s1) = min(w1, w2, (w1 + w2)/2 - d)``,
    the union is ``w1 + w2 - inter`` and the enclosing span ``w1 + w2 - overlap``. ``abs_center_diff``: d when
    the caller has it already (the L1 cost does).
    """
    _check_last_dim(spans1, "spans1")
    _check_last_dim(spans2, "spans2")
    w1, w2 = spans1[..., 1], spans2[..., 1]
    d = (spans1[..., 0] - spans2[..., 0]).abs() if abs_center_diff is None else abs_center_diff
    widths = w1 + w2
    overlap = torch.minimum(torch.minimum(w1, w2), 0.5 * widths - d)  # < 0 when disjoint
    inter = overlap.clamp(min=0)
    union = widths - inter
    enclosing = widths - overlap
    return inter / union - (enclosing - union) / enclosing


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``log(clamp(x, eps) / clamp(1 - x, eps))`` after clamping ``x`` to [0, 1] (spec §2.6)."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


__all__ = [
    "span_cxw_to_xx",
    "span_xx_to_cxw",
    "temporal_iou",
    "generalized_temporal_iou",
    "paired_generalized_temporal_iou",
    "inverse_sigmoid",
]
