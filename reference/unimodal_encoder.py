"""Unimodal encoders UE_v / UE_t (paper §3.1, spec §2.1).

Two layers of "LayerNorm -> Dropout(0.5) -> Linear", with a ReLU after the first one only::

    x1 = ReLU(Linear_{Din->d}(Drop(LN_{Din}(x))))
    V' = Linear_{d->d}(Drop(LN_d(x1)))

The momentum encoders of Distill Align are frozen copies of the same class. PyTorch default init.
"""

from __future__ import annotations

from torch import Tensor, nn


class UnimodalEncoder(nn.Module):
    """x (B, T, in_dim) -> (B, T, hidden_dim). Padded positions are not zeroed (callers mask)."""

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float = 0.5):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.linear1 = nn.Linear(in_dim, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear1(self.dropout(self.norm1(x))).relu()
        return self.linear2(self.dropout(self.norm2(x)))
