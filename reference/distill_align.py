"""Distill Align (paper §3.2 eqs. 3-7, spec §2.2-2.3): ALBEF-style momentum distillation with a MoCo queue,
plus the SimSiam-like ``loss_sim`` the released code adds (spec §7.1.2).

Given L2-normalised global features of the online encoders (Gv, Gt) and of the momentum encoders
(Gvm, Gtm), each (B, d), and the queues (d, K)::

    TXT = [Gtm^T | txt_queue],  VID = [Gvm^T | vid_queue]                      # (d, B+K)
    Y_v2t = alpha * softmax(Gvm TXT / tau) + (1 - alpha) * I                     # soft targets, no grad
    L_v2t = mean_b( -sum_j Y_v2t[b, j] * log_softmax(Gv TXT / tau)[b, j] )       # likewise t2v
    loss_align = (L_v2t + L_t2v) / 2
    loss_sim   = -( mean_b cos(h(ReLU(Gv)), Gt) + mean_b cos(h(ReLU(Gt)), Gv) ) / 2   # no stop-grad

tau is learnable (init 0.07) and clamped to [0.001, 0.5] before each training forward. Nothing from here
feeds the predictions; it only adds losses that shape the unimodal features.

Departure from the official code: the global means are *masked* means (the official mean runs over the
padded length); identical on unpadded batches. The enqueue keeps the official rule (skipped when
``queue_length % batch`` is not 0) and takes an optional ``gather`` hook so distributed training can keep
one global queue.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """x (B, T, d), mask (B, T) bool -> (B, d): mean over the valid positions only."""
    m = mask.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def global_feature(x: Tensor, mask: Tensor) -> Tensor:
    """L2-normalised masked mean: (B, T, d) -> (B, d)."""
    return F.normalize(masked_mean(x, mask), dim=-1)


def warmup_alpha(alpha: float, epoch: int, batch_idx: int, num_batches: int) -> float:
    """The official alpha warm-up: linear over the first epoch, then constant (spec §2.3 step 1)."""
    if epoch > 0 or num_batches <= 0:
        return alpha
    return alpha * min(1.0, batch_idx / num_batches)


class DistillAlign(nn.Module):
    """Holds tau, the predictor ``h`` of loss_sim, and the two feature queues (official names)."""

    def __init__(self, hidden_dim: int = 256, queue_length: int = 65536, temperature: float = 0.07):
        super().__init__()
        self.queue_length = queue_length
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.h = nn.Linear(hidden_dim, hidden_dim)
        nn.init.xavier_uniform_(self.h.weight)
        self.register_buffer("vid_queue", F.normalize(torch.randn(hidden_dim, queue_length), dim=0))
        self.register_buffer("txt_queue", F.normalize(torch.randn(hidden_dim, queue_length), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, gv: Tensor, gt: Tensor, gv_m: Tensor, gt_m: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
        """All inputs (B, d), L2-normalised; returns (loss_align, loss_sim), scalars."""
        if self.training:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        return self.align_loss(gv, gt, gv_m, gt_m, alpha), self.sim_loss(gv, gt)

    def align_loss(self, gv: Tensor, gt: Tensor, gv_m: Tensor, gt_m: Tensor, alpha: float) -> Tensor:
        """loss_align (spec §2.3 steps 3-5): soft-target cross-entropy against [momentum batch | queue]."""
        with torch.no_grad():
            txt_bank = torch.cat([gt_m.t(), self.txt_queue.clone()], dim=1)  # (d, B+K)
            vid_bank = torch.cat([gv_m.t(), self.vid_queue.clone()], dim=1)  # (d, B+K)
            eye = torch.zeros(gv.shape[0], txt_bank.shape[1], device=gv.device, dtype=gv.dtype)
            eye.fill_diagonal_(1.0)  # (B, B+K): ones on the first B diagonal entries
            y_v2t = alpha * F.softmax(gv_m @ txt_bank / self.temp, dim=1) + (1 - alpha) * eye
            y_t2v = alpha * F.softmax(gt_m @ vid_bank / self.temp, dim=1) + (1 - alpha) * eye
        s_v2t = gv @ txt_bank / self.temp  # (B, B+K), online query vs momentum bank
        s_t2v = gt @ vid_bank / self.temp
        loss_v2t = -(F.log_softmax(s_v2t, dim=1) * y_v2t).sum(1).mean()
        loss_t2v = -(F.log_softmax(s_t2v, dim=1) * y_t2v).sum(1).mean()
        return (loss_v2t + loss_t2v) / 2

    def sim_loss(self, gv: Tensor, gt: Tensor) -> Tensor:
        """loss_sim (spec §2.3 step 7): SimSiam-like, shared predictor h, no stop-gradient."""
        p_v, p_t = self.h(gv.relu()), self.h(gt.relu())
        return -(F.cosine_similarity(p_v, gt, dim=-1).mean() + F.cosine_similarity(p_t, gv, dim=-1).mean()) / 2

    @torch.no_grad()
    def enqueue(self, gv_m: Tensor, gt_m: Tensor, gather: Callable[[Tensor], Tensor] | None = None) -> None:
        """Write the momentum features (B, d) into the queues at queue_ptr (spec §2.3 step 6).

        ``gather`` (e.g. an all-gather over DDP ranks) turns the local (B, d) into the global (W*B, d)
        before the write, so every rank keeps the same global queue.
        """
        if gather is not None:
            gv_m, gt_m = gather(gv_m), gather(gt_m)
        b = gv_m.shape[0]
        if self.queue_length % b != 0:  # official rule: partial batches are not enqueued
            return
        # columns ptr .. ptr+b-1, wrapping around the end (a short batch can leave ptr unaligned; the
        # official slice write would then fail)
        cols = (self.queue_ptr + torch.arange(b, device=self.queue_ptr.device)) % self.queue_length
        self.vid_queue[:, cols] = gv_m.t().to(self.vid_queue.dtype)
        self.txt_queue[:, cols] = gt_m.t().to(self.txt_queue.dtype)
        self.queue_ptr[0] = (self.queue_ptr[0] + b) % self.queue_length
