"""Padding removed: the clips a forward computes, packed into one row block (the fused model's CPU layout).

A padded batch (B, L) spends the per-clip work — the video encoder, every linear, LayerNorm and FFN of the
fuser's layers, the decoder's memory GEMMs, ~85 % of the FLOPs — on clips whose values no valid output
reads. Off CUDA the fused model computes those row-wise ops on the packed rows only, (1, R, w) instead of
(B, L, w), and goes back to the padded layout just where clips meet (attention, V2T, the conv stack, the
saliency head); the gains scale with the padding (none for an unpadded batch, which keeps the padded layout).

The computed clips of sample b are every valid clip, every clip before its length ``sum(mask[b])`` (the
saliency GRU reads the top-1 window's clips by position, padded or not, as the reference does: this keeps
a mask with holes exact) and, for a sample with no valid clip, all of them (its attention weighs every
clip equally). Every other clip enters no valid output: attention adds the dtype's lowest value to its key
(weight exactly 0 whatever the key holds, as long as it is finite), the conv stack zeroes it, V2T's
column softmax masks it. So in the padded layout those positions may hold any finite value: ``unpack``
fills each with the packed row just before it (a copy of a real row: finite), and outputs there are not
meaningful (as in the reference; consumers read ``saliency[b, :length]``).

    packing = Packing.of(vkeep)   # None when there is little to skip (or on CUDA / while tracing)
    x = packing.pack(x_padded)    # (B, L, w) -> (1, R, w)
    y = packing.unpack(x)         # (1, R, w) -> (B, L, w)

CUDA keeps the padded layout (``of`` needs the row count on the host: a sync, and shapes a CUDA graph or a
compiled graph could not replay); so do ``torch.compile``, ``torch.export`` and ONNX export.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.onednn import is_tracing

#: pack only when at least this fraction of the batch's clips is skipped: below it the gathers cost about what
#: the skipped rows save (B=32 bf16, 2 threads: an unpadded batch forced through it 1.03x slower, 7 % of the
#: clips skipped 1.02x faster, the benchmark's 24.5 % 1.13x)
MIN_SKIPPED = 1 / 16
_enabled = [True]


def set_row_packing(enabled: bool) -> None:
    """Turn padding removal on or off (process-wide; on by default, CPU eager only)."""
    _enabled[0] = bool(enabled)


class Packing:
    """The packed layout of one forward: ``index`` (R,) the flat positions b * L + t of the computed clips,
    ascending; ``fill`` (B * L,) for every padded position the packed row it reads (its own for a computed
    clip, else the computed row before it)."""

    def __init__(self, index: Tensor, fill: Tensor, vkeep: Tensor):
        self.index, self.fill, self.vkeep = index, fill, vkeep
        self.b, self.l = vkeep.shape
        self._neighbours: Tensor | None = None
        self._zeros: dict = {}

    @property
    def count(self) -> int:
        return self.index.numel()

    @staticmethod
    def computed(vkeep: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, L) bool: the clips whose values some valid output reads (see the module doc); ``lengths`` (B,)
        the valid counts if already known."""
        lengths = (vkeep.sum(1) if lengths is None else lengths)[:, None]
        before_length = torch.arange(vkeep.shape[1], device=vkeep.device) < lengths
        return vkeep | before_length | (lengths == 0)

    @classmethod
    def of(cls, vkeep: Tensor, lengths: Tensor | None = None, force: bool = False) -> "Packing | None":
        """The packed layout for a (B, L) bool mask (``lengths`` (B,): its valid counts, if known), or None where
        the padded layout runs: CUDA, tracing, packing off, or fewer than :data:`MIN_SKIPPED` of the clips to
        skip (``force``: pack whenever on the CPU, eager and enabled — tests)."""
        if not _enabled[0] or vkeep.device.type == "cuda" or is_tracing():
            return None
        b, l = vkeep.shape
        if lengths is None:
            lengths = vkeep.sum(1)
        if not force and int(lengths.sum()) == b * l:  # nothing padded (B = 1 mostly): one small reduction
            return None
        comp = cls.computed(vkeep, lengths).reshape(-1)
        index = comp.nonzero().squeeze(1)  # its size: the row count (no further host read)
        if not force and index.numel() > (1 - MIN_SKIPPED) * b * l:
            return None
        fill = (comp.cumsum(0) - 1).clamp_min_(0)  # the packed row at or before each position
        return cls(index, fill, vkeep)

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, w) (any strides, expanded included) -> (1, R, w) contiguous: the computed clips' rows."""
        return x.reshape(self.b * self.l, -1).index_select(0, self.index).view(1, self.count, -1)

    def unpack(self, x: Tensor) -> Tensor:
        """(1, R, w) -> (B, L, w) contiguous; positions not computed hold a copy of a computed row (finite)."""
        return x.reshape(self.count, -1).index_select(0, self.fill).view(self.b, self.l, -1)

    def neighbours(self) -> Tensor:
        """(R, 3) long: for each computed clip (b, t) the packed rows of (b, t - 1), (b, t), (b, t + 1) where that
        clip is valid, else R (a zero row: outside the video or not valid)."""
        if self._neighbours is None:
            r, n = self.count, self.b * self.l
            t = self.index % self.l
            valid = self.vkeep.reshape(-1)
            cols = []
            for k in (-1, 0, 1):
                p = (self.index + k).clamp(0, n - 1)
                ok = (t + k >= 0) & (t + k < self.l) & valid[p]
                cols.append(torch.where(ok, self.fill[p], r))
            self._neighbours = torch.stack(cols, 1)
        return self._neighbours

    def shifted(self, x: Tensor) -> Tensor:
        """x (R, d) -> (R, 3d): row r = [x_{t-1} | x_t | x_{t+1}] of its clip (b, t), zeros where that clip is not
        valid or outside the video (the reference's zeroing before each k=3 conv)."""
        r, d = x.shape
        key = (x.dtype, d)
        if key not in self._zeros:
            self._zeros[key] = x.new_zeros(1, d)
        return torch.cat([x, self._zeros[key]]).index_select(0, self.neighbours().view(-1)).view(r, 3 * d)

    def per_row(self, x: Tensor) -> Tensor:
        """(B, w) per-sample values -> (1, R, w): each computed clip's sample's row."""
        return x.index_select(0, torch.div(self.index, self.l, rounding_mode="floor")).view(1, self.count, -1)


def to_padded(x: Tensor, packing: Packing | None) -> Tensor:
    """x in the padded layout (B, L, w): unpacked if ``packing`` is set, else x itself."""
    return x if packing is None else packing.unpack(x)


def to_rows(x: Tensor, packing: Packing | None) -> Tensor:
    """x in the layout the row-wise ops run in: (1, R, w) packed if ``packing`` is set, else x itself."""
    return x if packing is None else packing.pack(x)
