"""Convolutional Blocks of the Convolutional Fuser (paper §3.3 eqs. 25-28, spec §2.5(d)).

Each residual block works on (B, d, L)::

    y = ReLU(x + BN2(Conv2(ReLU(BN1(Conv1(x))))))      # Conv: Conv1d(d, d, k=3, pad=1, bias)

Departure from the official code (spec §7.3): padded clips are zeroed before every convolution, so the
k=3 windows at a video's last clip never read padding and a sample's outputs do not depend on the other
videos in its batch. On an unpadded batch this is the official computation.

BN statistics in training (``bn_stats``): ``"all"`` (default, the official behaviour) takes them over every
position of the padded batch, the zeroed padding included, so how far a batch is padded changes the math;
``"valid"`` (a departure, used with ``--cuda-graph``, whose fixed length buckets pad further) takes the
batch mean / variance over valid clips only and updates the running statistics with those (unbiased
variance, as ``nn.BatchNorm1d`` does), so bucket padding never changes a result. Both are the same on an
unpadded batch; eval mode always uses the running statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BN_STATS = ("all", "valid")


def masked_batch_norm(x: Tensor, mask: Tensor, bn: nn.BatchNorm1d) -> Tensor:
    """Training-mode ``bn`` on x (B, d, L) with statistics over the positions where mask (B, 1, L) is 1.

    ``mean = sum(m x) / n``, ``var = sum(m (x - mean)^2) / n`` per channel (n = valid positions); the running
    statistics move by ``momentum`` towards (mean, var * n / (n - 1)), like ``F.batch_norm``'s."""
    if bn.momentum is None:
        raise ValueError("bn_stats='valid' needs a BatchNorm with a float momentum")
    n = mask.sum()  # 0-dim: valid positions (no host read)
    mean = (x * mask).sum((0, 2)) / n  # (d,)
    centred = x - mean[:, None]  # (B, d, L)
    var = (centred * centred * mask).sum((0, 2)) / n  # (d,) biased, for normalising
    if bn.track_running_stats:
        with torch.no_grad():
            bn.running_mean.lerp_(mean.detach(), bn.momentum)
            bn.running_var.lerp_(var.detach() * (n / (n - 1).clamp(min=1)), bn.momentum)
            bn.num_batches_tracked.add_(1)
    out = centred * torch.rsqrt(var + bn.eps)[:, None]
    return out * bn.weight[:, None] + bn.bias[:, None] if bn.affine else out


class ConvolutionalBlock(nn.Module):
    """One residual block. x (B, d, L), mask (B, 1, L) float (1 = valid) or None -> (B, d, L)."""

    def __init__(self, hidden_dim: int = 256, bn_stats: str = "all"):
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        self.bn_stats = bn_stats
        d = hidden_dim
        self.conv1 = nn.Conv1d(d, d, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm1d(d)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm1d(d)

    def _bn(self, bn: nn.BatchNorm1d, y: Tensor, mask: Tensor | None) -> Tensor:
        if self.bn_stats == "valid" and self.training and mask is not None:
            return masked_batch_norm(y, mask, bn)
        return bn(y)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        y = x if mask is None else x * mask
        y = self._bn(self.bn1, self.conv1(y), mask).relu()
        y = y if mask is None else y * mask
        y = self._bn(self.bn2, self.conv2(y), mask)
        return (x + y).relu()


class ConvolutionalBlocks(nn.Module):
    """N residual blocks (official name ``convolutional_block.blocks.{i}``).

    forward(x (L, B, d) sequence-first, vid_mask (B, L) bool) -> (L, B, d).
    """

    def __init__(self, hidden_dim: int = 256, num_blocks: int = 5, bn_stats: str = "all"):
        super().__init__()
        self.blocks = nn.ModuleList(ConvolutionalBlock(hidden_dim, bn_stats) for _ in range(num_blocks))

    def forward(self, x: Tensor, vid_mask: Tensor) -> Tensor:
        x = x.permute(1, 2, 0)  # (L, B, d) -> (B, d, L)
        mask = vid_mask.to(x.dtype)[:, None, :]  # (B, 1, L)
        for block in self.blocks:
            x = block(x, mask)
        return x.permute(2, 0, 1)  # (B, d, L) -> (L, B, d)
