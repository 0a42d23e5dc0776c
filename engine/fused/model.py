"""The fused inference LD-DETR (replaces ``reference.model.LDDETR`` at inference), built from its weights.

    from engine.fused import FusedLDDETR
    fused = FusedLDDETR.from_reference(model)          # model: a reference LDDETR (any config)
    out = fused(video, video_mask, text, text_mask)    # pred_logits, pred_spans, saliency_scores, video_mask

Same inputs and outputs as the reference's eval forward (minus ``aux_outputs``); see each component's module
for what it computes differently: :mod:`.fuser` (encoders, V2T, T2V, encoder stacks, conv blocks),
:mod:`.decoder` (Loop Decoder), :mod:`.heads`, :mod:`.positions`; off CUDA a padded batch runs its per-clip work
on the clips some valid output reads only (:mod:`.packing`). It defines no structure or
hyper-parameter of its own: every size, count and constant is read from the reference modules.

Half precision is native: :meth:`FusedLDDETR.to_dtype` stores weights and activations in bf16/fp16 (LayerNorm,
softmax and the GRU state accumulate in fp32 inside their kernels; the decoder's reference points and the
top-1 slice bounds stay fp32), no autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.model import LDDETR
from reference.validate import as_bool_mask, check_input_shapes

from .common import FusedModule, attention_mask, f64
from .decoder import FusedLoopDecoder
from .fuser import FusedConvolutionalFuser, FusedUnimodalEncoder, text_extra, video_extra
from .heads import FusedHighlightDetectionHead, FusedMomentRetrievalHead, saliency_rows
from .packing import Packing
from .positions import SineTable


class FusedLDDETR(FusedModule):
    replaces = "reference.model.LDDETR"

    def __init__(self, model: LDDETR):
        super().__init__()
        cfg = self.cfg = model.cfg
        fuser = model.convolutional_fuser
        v2t = fuser.v2t_extractor
        self.d = cfg.hidden_dim
        self.video_encoder = FusedUnimodalEncoder(model.video_encoder, extra=video_extra(v2t))
        self.text_encoder = FusedUnimodalEncoder(
            model.text_encoder, extra=text_extra(v2t, fuser.t2v_encoder.layers, cfg.use_txt_pos))
        self.position = SineTable(model.position_embed, cfg.max_video_len)
        if cfg.use_txt_pos:
            tp = model.txt_position_embed
            self.put("txt_pos", f64(tp.position_embeddings.weight))
            self.put("txt_pos_ln_w", f64(tp.LayerNorm.weight)), self.put("txt_pos_ln_b", f64(tp.LayerNorm.bias))
            self.txt_pos_eps = tp.LayerNorm.eps
        self.fuser = FusedConvolutionalFuser(fuser, cfg.use_txt_pos)
        hd = model.prediction_heads.highlight_detection_prediction_head
        self.decoder = FusedLoopDecoder(model.loop_decoder, model.query_embed.weight, mem_extra=saliency_rows(hd))
        self.mr_head = FusedMomentRetrievalHead(model.prediction_heads.video_moment_retrieval_prediction_head,
                                               input_shift=self.decoder.input_shift)
        self.hd_head = FusedHighlightDetectionHead(hd)
        self.dtype = torch.float32
        self.eval().requires_grad_(False)

    @classmethod
    def from_reference(cls, model: LDDETR) -> "FusedLDDETR":
        if not isinstance(model, LDDETR):
            raise TypeError(f"FusedLDDETR.from_reference expects a reference LDDETR, got {type(model).__name__}")
        was_training = model.training
        model.eval()  # build-time constant folding runs reference modules: dropout must be off
        try:  # normal tensors even when called under inference_mode (the packed-GEMM cache needs versions)
            with torch.inference_mode(False), torch.no_grad():
                return cls(model).to(next(model.parameters()).device)
        finally:
            model.train(was_training)

    def to_dtype(self, dtype: torch.dtype) -> "FusedLDDETR":
        """Store every weight in ``dtype`` (float32, bfloat16 or float16) except the fp32 constants each
        module lists in ``keep_fp32`` (reference-point constants, sine frequencies, the position table)."""
        with torch.inference_mode(False), torch.no_grad():  # normal tensors (see from_reference)
            for m in self.modules():
                keep = getattr(m, "keep_fp32", ())
                for name, buf in list(m.named_buffers(recurse=False)):
                    if buf.is_floating_point() and name not in keep and name != "table":
                        setattr(m, name, buf.to(dtype))
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(dtype)
        self.dtype = dtype
        return self

    def forward(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor) -> dict:
        """video (B or 1, T, Dv), masks (B, T) / (B, N) bool or {0, 1} (valid first), text (B, N, Dt) ->
        pred_logits (B, Q, 2), pred_spans (B, Q, 2), saliency_scores (B, T), video_mask (B, T) bool."""
        cfg = self.cfg
        check_input_shapes(video, video_mask, text, text_mask, v_feat_dim=cfg.v_feat_dim, t_feat_dim=cfg.t_feat_dim,
                           max_v_l=cfg.max_video_len, max_q_l=cfg.max_q_l if cfg.use_txt_pos else None)
        vkeep, tkeep = as_bool_mask(video_mask), as_bool_mask(text_mask)
        if video.dtype != self.dtype:
            video = video.to(self.dtype)
        if text.dtype != self.dtype:
            text = text.to(self.dtype)
        b, l = text.shape[0], video.shape[1]
        lengths = vkeep.sum(1)  # (Bv,)
        # padding removed off CUDA: the per-clip work runs on the clips some valid output reads (see .packing)
        packing = Packing.of(*((vkeep, lengths) if video.shape[0] == b else (vkeep.expand(b, -1), lengths.expand(b))))
        if packing is not None and video.shape[0] == b:
            vid_packed = self.video_encoder(packing.pack(video))  # (1, R, d + 2)
            vid_ext = packing.unpack(vid_packed)
        else:
            vid_ext = self.video_encoder(video)  # (Bv, L, d + 2) [V' | V'wC | 1]
            vid_packed = None
        txt_ext = self.text_encoder(text)  # (B, N, ...) see fuser.text_extra
        pos = self.position(lengths, l, self.dtype)  # (Bv, L, d)
        if video.shape[0] != b:  # one video, several queries: the video side is encoded once
            vid_ext, vkeep, pos = vid_ext.expand(b, -1, -1), vkeep.expand(b, -1), pos.expand(b, -1, -1)
            lengths = lengths.expand(b)
        if packing is not None:
            pos = packing.pack(pos)  # (1, R, d)
            if vid_packed is None:
                vid_packed = packing.pack(vid_ext)
        pos_txt = None
        if cfg.use_txt_pos:
            n, d = text.shape[1], self.d
            pos_txt = F.layer_norm(txt_ext[..., :d] + self.txt_pos[:n], (d,), self.txt_pos_ln_w, self.txt_pos_ln_b,
                                   self.txt_pos_eps)
        vmask = attention_mask(vkeep, self.decoder.nhead, self.dtype)  # shared by the fuser and the decoder
        if self.fuser.nhead != self.decoder.nhead:
            vmask_fuser = attention_mask(vkeep, self.fuser.nhead, self.dtype)
        else:
            vmask_fuser = vmask
        memory = self.fuser(vid_ext, txt_ext, pos, pos_txt, vkeep, tkeep, vmask_fuser, packing, vid_packed)  # R (B, L, d) / (1, R', d)
        hs, inv, r2 = self.decoder(memory, pos, vkeep, vmask, packing)  # inv: the last layer's input ref, inverse_sigmoid
        logits, spans = self.mr_head(hs, inv)
        saliency = self.hd_head(logits, spans, vid_ext[..., :self.d], r2, lengths)
        return {"pred_logits": logits, "pred_spans": spans, "saliency_scores": saliency, "video_mask": vkeep}
