"""What gets exported: the inference engine's fused model (engine.fused, built from a reference LDDETR) behind a fixed
signature, with named inputs and outputs and the metadata that travels with every artifact."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

INPUT_NAMES = ("video", "video_mask", "text", "text_mask")
OUTPUT_NAMES = ("pred_logits", "pred_spans", "saliency_scores")


class ExportModule(nn.Module):
    """(video (B, T, Dv) float, video_mask (B, T) bool, text (B, N, Dt) float, text_mask (B, N) bool) ->
    (pred_logits (B, Q, 2), pred_spans (B, Q, 2), saliency_scores (B, T)). The fused eval forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor):
        out = self.model(video, video_mask, text, text_mask)
        return out["pred_logits"], out["pred_spans"], out["saliency_scores"]


@dataclass
class Prepared:
    module: ExportModule
    cfg: object
    metadata: dict[str, str]
    source: str
    device: str = "cpu"


def prepare(checkpoint: str | os.PathLike, device: str = "cpu") -> Prepared:
    """Load a checkpoint written by engine.train and build the engine's inference model from it (fp32, no
    kernels: export traces plain torch ops; ``device`` "cuda" for a GPU AOTInductor package)."""
    from engine.checkpoint import load_checkpoint
    from engine.inference import build

    model, meta = load_checkpoint(checkpoint)
    eng = build(model, device=device, backend="torch", buckets=(), text_buckets=(), cuda_graphs=False)
    metadata = {
        "ld_detr.config": json.dumps(model.cfg.to_dict()),
        "ld_detr.feature_contract": json.dumps(meta.get("feature_contract")),
        "ld_detr.inputs": json.dumps(list(INPUT_NAMES)),
        "ld_detr.outputs": json.dumps(list(OUTPUT_NAMES)),
        "ld_detr.checkpoint": os.path.basename(os.fspath(checkpoint)),
        "ld_detr.epoch": str(meta.get("epoch")),
        "ld_detr.dataset": str((meta.get("meta") or {}).get("dataset", "qvhighlights")),
    }
    return Prepared(ExportModule(eng.model).eval(), model.cfg, metadata, os.fspath(checkpoint), device)


def example_inputs(cfg, batch: int, video_len: int, text_len: int, *, seed: int = 0,
                   dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random features (never zeros) with per-sample valid lengths (the first sample unpadded)."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, video_len, cfg.v_feat_dim, generator=g).to(dtype)
    text = torch.randn(batch, text_len, cfg.t_feat_dim, generator=g).to(dtype)
    vlen = torch.randint(max(1, video_len // 2), video_len + 1, (batch,), generator=g)
    tlen = torch.randint(1, text_len + 1, (batch,), generator=g)
    vlen[0], tlen[0] = video_len, text_len
    video_mask = torch.arange(video_len)[None] < vlen[:, None]
    text_mask = torch.arange(text_len)[None] < tlen[:, None]
    return tuple(x.to(device) for x in (video, video_mask, text, text_mask))
