"""LD-DETR (paper §3, spec §2): Unimodal Encoders -> Distill Align -> Convolutional Fuser -> Loop Decoder
-> Prediction Heads.

Module and parameter names follow the official ``LD_DETR`` (``../shared/spec/official-state-dict.tsv``), so
an official checkpoint loads through :func:`reference.convert.convert_official_state_dict`, a near-identity.

Departures from the released code, each documented in the file that makes it:

* the Loop Decoder loops ``decoder_loops`` times (3 by default; 1 = the release, spec §7.1.1);
* padding never leaks into a sample's outputs (masked global means, padded clips zeroed before the
  convolutions, the highlight head uses each sample's own length) — identical on unpadded batches;
* eval mode never touches the momentum encoders or the queue (the official eval forward takes a momentum
  step; predictions never depend on it), and the text positional table exists only with ``use_txt_pos``.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from .config import LDDETRConfig
from .decoder import LoopDecoder
from .distill_align import DistillAlign, global_feature
from .fuser import ConvolutionalFuser
from .heads import PredictionHeads
from .position_encoding import PositionEmbeddingSine, TrainablePositionalEncoding
from .unimodal_encoder import UnimodalEncoder
from .validate import as_bool_mask, check_input_shapes


class LDDETR(nn.Module):
    """LD-DETR for video moment retrieval + highlight detection.

    ``forward(video, video_mask, text, text_mask, alpha=None) -> dict`` with

    * video (B, T, v_feat_dim) float, text (B, N, t_feat_dim) float; a single video (1, T, v_feat_dim)
      with B queries is encoded once and broadcast;
    * masks (B, T) / (B, N), bool or {0, 1} float, True / 1 = valid (valid positions first);
    * ``alpha``: the Distill Align coefficient for this step (training only; default
      ``cfg.distillation_coefficient``; see :func:`reference.distill_align.warmup_alpha`).

    Returns ``pred_logits`` (B, Q, 2; class 0 = foreground), ``pred_spans`` (B, Q, 2; normalised
    center, width), ``saliency_scores`` (B, T; entries past a sample's length are not meaningful),
    ``video_mask`` (B, T) bool, ``aux_outputs`` (list over the earlier decoder layers of dicts with
    ``pred_logits``/``pred_spans``; when ``cfg.aux_loss``) and, in training mode, the scalars
    ``loss_align`` and ``loss_sim``.
    """

    def __init__(self, cfg: LDDETRConfig | None = None):
        super().__init__()
        cfg = cfg or LDDETRConfig()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.queue_gather: Callable[[Tensor], Tensor] | None = None  # set by distributed training

        if cfg.use_txt_pos:
            self.txt_position_embed = TrainablePositionalEncoding(cfg.max_q_l, d, dropout=cfg.input_dropout)
        self.video_encoder = UnimodalEncoder(cfg.v_feat_dim, d, cfg.input_dropout)
        self.text_encoder = UnimodalEncoder(cfg.t_feat_dim, d, cfg.input_dropout)
        self.momentum_video_encoder = copy.deepcopy(self.video_encoder).requires_grad_(False)
        self.momentum_text_encoder = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.distill_align = DistillAlign(d, cfg.queue_length, cfg.temperature)
        self.position_embed = PositionEmbeddingSine(d)
        self.convolutional_fuser = ConvolutionalFuser(
            d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.v2t_dropout, cfg.num_v2t_encoder_layers,
            cfg.num_encoder1_layers, cfg.num_convolutional_blocks, cfg.num_encoder2_layers, cfg.bn_stats)
        self.query_embed = nn.Embedding(cfg.num_queries, 2)  # learned un-sigmoided (center, width) anchors
        self.loop_decoder = LoopDecoder(cfg.num_decoder_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout,
                                        loops=cfg.decoder_loops)
        self.prediction_heads = PredictionHeads(d, cfg.clip_length)

    # ------------------------------------------------------------------------------------------------
    def _momentum_pairs(self):
        return ((self.momentum_video_encoder, self.video_encoder), (self.momentum_text_encoder, self.text_encoder))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_m <- m * theta_m + (1 - m) * theta for both momentum encoders (spec §2.2)."""
        m = self.cfg.momentum
        for momentum_enc, enc in self._momentum_pairs():  # one foreach kernel per op, not one per tensor
            pm, p = list(momentum_enc.parameters()), [t.detach() for t in enc.parameters()]
            torch._foreach_mul_(pm, m)
            torch._foreach_add_(pm, p, alpha=1.0 - m)

    def align_losses(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor,
                     vid: Tensor, txt: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Distill Align on already-encoded V', T'. Returns (loss_align, loss_sim, Gvm, Gtm).

        Runs the momentum encoders as they are (no update, no enqueue)."""
        with torch.no_grad():
            gv_m = global_feature(self.momentum_video_encoder(video), video_mask)
            gt_m = global_feature(self.momentum_text_encoder(text), text_mask)
        gv, gt = global_feature(vid, video_mask), global_feature(txt, text_mask)
        loss_align, loss_sim = self.distill_align(gv, gt, gv_m, gt_m, alpha)
        return loss_align, loss_sim, gv_m, gt_m

    def forward(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor,
                alpha: float | None = None) -> dict:
        cfg = self.cfg
        check_input_shapes(video, video_mask, text, text_mask, v_feat_dim=cfg.v_feat_dim, t_feat_dim=cfg.t_feat_dim,
                           max_v_l=cfg.max_video_len, max_q_l=cfg.max_q_l if cfg.use_txt_pos else None)
        video_mask, text_mask = as_bool_mask(video_mask), as_bool_mask(text_mask)

        vid = self.video_encoder(video)  # V' (B, L, d)
        txt = self.text_encoder(text)  # T' (B, N, d)
        if video.shape[0] != text.shape[0]:  # one video, several queries: encode the video once
            b = text.shape[0]
            vid, video, video_mask = vid.expand(b, -1, -1), video.expand(b, -1, -1), video_mask.expand(b, -1)
        out: dict = {}
        if self.training:
            self.momentum_update()
            a = cfg.distillation_coefficient if alpha is None else alpha
            out["loss_align"], out["loss_sim"], gv_m, gt_m = self.align_losses(
                video, video_mask, text, text_mask, vid, txt, a)
            self.distill_align.enqueue(gv_m, gt_m, gather=self.queue_gather)

        # the sine table is computed in fp32 and follows the parameters' dtype (a no-op unless the model was
        # converted with .half(), e.g. for an fp16 export; autocast leaves the parameters fp32)
        pos_vid = self.position_embed(video_mask).to(self.query_embed.weight.dtype)  # (B, L, d)
        pos_txt = self.txt_position_embed(txt) if cfg.use_txt_pos else None
        memory = self.convolutional_fuser(vid, txt, video_mask, text_mask, pos_vid, pos_txt)  # R (L, B, d)

        hs, references = self.loop_decoder(memory, ~video_mask, pos_vid.transpose(0, 1), self.query_embed.weight)
        mr_head = self.prediction_heads.video_moment_retrieval_prediction_head
        logits, spans = mr_head(hs, references)  # (n_layers, B, Q, 2) each
        lengths = video_mask.sum(1)  # (B,)
        out["saliency_scores"] = self.prediction_heads.highlight_detection_prediction_head(
            logits[-1], spans[-1], vid, memory.transpose(0, 1), lengths)  # (B, L)
        out["pred_logits"], out["pred_spans"] = logits[-1], spans[-1]
        out["video_mask"] = video_mask
        if cfg.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_spans": b} for a, b in zip(logits[:-1], spans[:-1])]
        return out

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
