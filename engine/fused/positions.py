"""Positional embeddings precomputed once (replaces ``reference.position_encoding.PositionEmbeddingSine`` and
the per-call ``anchor_sine_embed`` of the decoder).

* :class:`SineTable` — the video clips' normalised sine embedding depends only on a sample's valid length n
  and the position i: ``sine(min(i + 1, n) / (n + 1e-6) * 2 pi)`` (masks are valid-first prefixes, as
  ``reference.validate`` requires). A buffer ``table[n, i]`` for every n <= max_len is computed by the
  reference module itself at build time, so a forward is one gather. Uncapped presets (``max_v_l <= 0``)
  start with a table for 128 clips that grows (eagerly, outside compiled/exported graphs) to the longest
  video seen, up to ``MAX_TABLE_CLIPS``; beyond it (and inside traced graphs when a length may exceed the
  table) the reference formula runs.
* :func:`anchor_sine` — DAB-DETR's anchor embedding as one ``addcmul`` + ``sin``: ``sin(x * 2 pi / dim_t +
  phase)`` with phase pi/2 on the odd (cosine) channels. Differs from the reference's ``sin``/``cos`` by
  ~1 ulp of the argument (<= 5e-7 absolute).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reference.position_encoding import PositionEmbeddingSine

from .common import FusedModule
from kernels.onednn import is_tracing as _is_tracing

MAX_TABLE_CLIPS = 512  # 513 x 512 x 256 fp32 = 257 MiB: uncapped presets fall back to the formula beyond
UNCAPPED_START = 128


class SineTable(FusedModule):
    replaces = "reference.position_encoding.PositionEmbeddingSine"

    def __init__(self, ref: PositionEmbeddingSine, max_len: int | None):
        super().__init__()
        self.ref = ref  # parameter-free; used to (re)build the table and beyond it
        self.capped = max_len is not None
        self.put("table", self._build(max_len or UNCAPPED_START))

    @classmethod
    def from_reference(cls, ref: PositionEmbeddingSine, max_len: int | None) -> "SineTable":
        return cls(ref, max_len)

    def _build(self, n_max: int) -> Tensor:
        lengths = torch.arange(n_max + 1)  # 0 .. n_max valid clips
        mask = torch.arange(n_max)[None, :] < lengths[:, None]  # (n_max + 1, n_max)
        return self.ref(mask)  # (n_max + 1, n_max, d), float32

    def forward(self, lengths: Tensor, length: int, dtype: torch.dtype) -> Tensor:
        """lengths (B,) valid clips per sample, ``length`` the padded length L -> (B, L, d) in ``dtype``."""
        if not self.capped and length > self.table.shape[1]:
            if length <= MAX_TABLE_CLIPS and not _is_tracing():
                n = min(MAX_TABLE_CLIPS, max(length, 2 * self.table.shape[1]))
                self.table = self._build(n).to(self.table.device)
            else:
                mask = torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]
                return self.ref(mask).to(dtype)
        pos = self.table[lengths, :length]  # (B, L, d)
        return pos if pos.dtype == dtype else pos.to(dtype)


def anchor_sine_constants(d_model: int, temperature: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(freq (half,), phase (half,)) with sine(x) = sin(x * freq + phase) per coordinate, half = d/2."""
    half = d_model // 2
    i = torch.arange(half, dtype=torch.float64)
    dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)
    freq = 2 * math.pi / dim_t
    phase = (i % 2) * (math.pi / 2)
    return freq, phase


def anchor_sine(ref: Tensor, freq: Tensor, phase: Tensor) -> Tensor:
    """ref (..., 2) (center, width) -> (..., d): the center block then the width block."""
    return torch.addcmul(phase, ref[..., None], freq).sin_().flatten(-2)
