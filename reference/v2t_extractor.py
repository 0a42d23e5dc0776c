"""V2T Extractor (paper §3.3 eqs. 8-19, spec §2.5(a)): VSLNet-style context-query attention (TR-DETR's
"VSLFuser"), then an attention-pooled text vector fused into every clip.

Shapes: V' (B, L, d), T' (B, N, d), masks (B, L) / (B, N) bool (True = valid) -> V'v (B, L, d)::

    A[b,i,j] = Drop(V')[b,i]·wC + Drop(T')[b,j]·wQ + sum_k Drop(V')[b,i,k] wM[k] Drop(T')[b,j,k]
    Ar = softmax_j(A masked by text),  Ac = softmax_i(A masked by video)
    Tv = Ar T',  Vt = Ar Ac^T V'
    F  = Conv1x1_{4d->d}([V' | Tv | V'*Tv | V'*Vt])
    Tp = sum_j softmax_j(T' wP masked) T'_j                      # (B, d), broadcast over L
    V'v = ReLU(Conv1x1_{2d->d}([F | Tp]))

Masked logits: the official code adds (1 - mask) * -1e30; here masked entries are set to the lowest finite
value of the logits' dtype. Both give masked entries a softmax weight of exactly 0 (every row has a valid
entry), so fp32/bf16 outputs are identical, but -1e30 overflows to -inf in fp16 and 0 * -inf = NaN poisons
the *valid* entries — the fp16 ONNX/TensorRT export needs finite masks. Padded clips get zero weight in Ac,
so a clip's output does not depend on the padding of its batch. Parameter names are the official ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

def _mask_logits(x: Tensor, mask: Tensor) -> Tensor:
    """x with entries where ``mask`` is False/0 set to the dtype's lowest finite value (broadcasting)."""
    keep = mask if mask.dtype == torch.bool else mask > 0.5
    return x.masked_fill(~keep, torch.finfo(x.dtype).min)


class V2TExtractor(nn.Module):
    def __init__(self, hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        d = hidden_dim
        self.w4C = nn.Parameter(torch.empty(d, 1))
        self.w4Q = nn.Parameter(torch.empty(d, 1))
        self.w4mlu = nn.Parameter(torch.empty(1, 1, d))
        self.weight = nn.Parameter(torch.empty(d, 1))  # wP of the attention pooling
        self.cqa_linear = nn.Conv1d(4 * d, d, kernel_size=1)
        self.conv1d = nn.Conv1d(2 * d, d, kernel_size=1)
        self.dropout = nn.Dropout(dropout)
        for p in (self.w4C, self.w4Q, self.w4mlu, self.weight):
            nn.init.xavier_uniform_(p)

    def _score(self, vid: Tensor, txt: Tensor) -> Tensor:
        c, q = self.dropout(vid), self.dropout(txt)
        s0 = c @ self.w4C  # (B, L, 1)
        s1 = (q @ self.w4Q).transpose(1, 2)  # (B, 1, N)
        s2 = (c * self.w4mlu) @ q.transpose(1, 2)  # (B, L, N)
        return s0 + s1 + s2  # (B, L, N)

    def forward(self, vid: Tensor, txt: Tensor, vid_mask: Tensor, txt_mask: Tensor) -> Tensor:
        score = self._score(vid, txt)  # (B, L, N)
        a_r = torch.softmax(_mask_logits(score, txt_mask[:, None, :]), dim=2)  # over tokens
        a_c = torch.softmax(_mask_logits(score, vid_mask[:, :, None]), dim=1)  # over clips
        t_v = a_r @ txt  # (B, L, d)
        v_t = (a_r @ a_c.transpose(1, 2)) @ vid  # (B, L, L) @ (B, L, d) -> (B, L, d)
        fused = torch.cat([vid, t_v, vid * t_v, vid * v_t], dim=2)  # (B, L, 4d)
        fused = self.cqa_linear(fused.transpose(1, 2)).transpose(1, 2)  # (B, L, d)

        beta = torch.softmax(_mask_logits(txt @ self.weight, txt_mask[:, :, None]), dim=1)  # (B, N, 1)
        pooled = (txt.transpose(1, 2) @ beta).squeeze(2)  # (B, d)
        pooled = pooled[:, None, :].expand(-1, vid.shape[1], -1)  # (B, L, d)
        out = self.conv1d(torch.cat([fused, pooled], dim=2).transpose(1, 2)).transpose(1, 2)
        return out.relu()  # (B, L, d)
