"""Convolutional Blocks of the Convolutional Fuser (paper §3.3 eqs. 25-28, spec §2.5(d)).

Each residual block works on (B, d, L)::

    y = ReLU(x + BN2(Conv2(ReLU(BN1(Conv1(x))))))      # Conv: Conv1d(d, d, k=3, pad=1, bias)

Departure from the official code (spec §7.3): padded clips are zeroed before every convolution, so the
k=3 windows at a video's last clip never read padding and a sample's outputs do not depend on the other
videos in its batch. On an unpadded batch this is the official computation. BN statistics in training
still include the (zeroed) padded positions, like the official code's.
"""

from __future__ import annotations

from torch import Tensor, nn


class ConvolutionalBlock(nn.Module):
    """One residual block. x (B, d, L), mask (B, 1, L) float (1 = valid) or None -> (B, d, L)."""

    def __init__(self, hidden_dim: int = 256):
        super().__init__()
        d = hidden_dim
        self.conv1 = nn.Conv1d(d, d, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm1d(d)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm1d(d)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        y = x if mask is None else x * mask
        y = self.bn1(self.conv1(y)).relu()
        y = y if mask is None else y * mask
        y = self.bn2(self.conv2(y))
        return (x + y).relu()


class ConvolutionalBlocks(nn.Module):
    """N residual blocks (official name ``convolutional_block.blocks.{i}``).

    forward(x (L, B, d) sequence-first, vid_mask (B, L) bool) -> (L, B, d).
    """

    def __init__(self, hidden_dim: int = 256, num_blocks: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList(ConvolutionalBlock(hidden_dim) for _ in range(num_blocks))

    def forward(self, x: Tensor, vid_mask: Tensor) -> Tensor:
        x = x.permute(1, 2, 0)  # (L, B, d) -> (B, d, L)
        mask = vid_mask.to(x.dtype)[:, None, :]  # (B, 1, L)
        for block in self.blocks:
            x = block(x, mask)
        return x.permute(2, 0, 1)  # (B, d, L) -> (L, B, d)
