"""Positional embeddings (spec §2.4 and the anchor sine embedding of §2.6).

* :class:`PositionEmbeddingSine` — the normalised 1-D sine embedding of the video clips. Positions are
  ``cumsum(mask) / (n_valid + 1e-6) * 2*pi``, so a sample's valid positions do not depend on how much
  padding follows it.
* :func:`anchor_sine_embed` — DAB-DETR's sine embedding of a (center, width) anchor: 128 channels for the
  center, then 128 for the width (hard-wired to d = 256 in the official code).
* :class:`TrainablePositionalEncoding` — the learned text positional table, only built with
  ``use_txt_pos=True`` (the official default builds it and never uses it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _interleaved_sine(x: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """x (...,) -> (..., num_feats) with sin at even and cos at odd channels."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = x[..., None] / dim_t  # (..., F)
    # stack (sin of even, cos of odd) then flatten -> [sin0, cos1, sin2, cos3, ...]
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Normalised sine embedding of clip positions.

    forward(mask) with mask (B, L) bool/float (True/1 = valid) -> (B, L, num_pos_feats).
    """

    def __init__(self, num_pos_feats: int = 256, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        x_embed = mask.to(torch.float32).cumsum(1)  # (B, L): 1..n_valid, then repeats n_valid
        x_embed = x_embed / (x_embed[:, -1:] + 1e-6) * self.scale
        return _interleaved_sine(x_embed, self.num_pos_feats, self.temperature)


def anchor_sine_embed(anchors: Tensor, d_model: int = 256) -> Tensor:
    """anchors (..., 2) (center, width) in [0, 1] -> (..., d_model): center block then width block."""
    half = d_model // 2
    center = _interleaved_sine(anchors[..., 0] * (2 * math.pi), half)
    width = _interleaved_sine(anchors[..., 1] * (2 * math.pi), half)
    return torch.cat((center, width), dim=-1)


class TrainablePositionalEncoding(nn.Module):
    """LayerNorm(x + learned_pos[:N]) -> Dropout. x (B, N, d) -> (B, N, d). Official names kept."""

    def __init__(self, max_position_embeddings: int, hidden_size: int, dropout: float = 0.5):
        super().__init__()
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        pos = self.position_embeddings(torch.arange(n, device=x.device))  # (N, d)
        return self.dropout(self.LayerNorm(x + pos[None]))
