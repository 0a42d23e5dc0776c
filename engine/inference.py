"""The inference engine: an inference-only LD-DETR built FROM a reference model's weights.

    from engine.inference import build
    eng = build("runs/synthetic/best.pt", device="cuda", dtype=torch.bfloat16)
    out = eng(video, video_mask, text, text_mask)   # pred_logits, pred_spans, saliency_scores, video_mask

``build`` transforms a reference ``LDDETR``; it never restates the model math (the forward *is* the
reference forward in eval mode):

* a private deep copy in eval mode, with the training-only state dropped: the momentum encoders and the
  two 64 MiB Distill-Align queues (eval never reads them);
* the Convolutional Blocks run on BN-folded weights: the fused Triton kernel on CUDA
  (``kernels.apply``), folded torch convolutions elsewhere;
* ``dtype=torch.bfloat16`` / ``float16`` runs under autocast (weights stay fp32, so every op keeps the
  reference's own precision rules);
* optional static-shape buckets: a video shorter than a bucket is padded to it and masked, which leaves
  the outputs unchanged because the reference is padding-invariant (tested), and gives
  ``torch.compile``/CUDA graphs one shape per bucket. Default: the preset's max video length on CUDA, none
  on CPU (padding would only add work there);
* optional ``compile``: "decoder" puts the Loop Decoder under ``torch.compile(fullgraph=True)``; "model"
  the whole forward, also with ``fullgraph=True`` — zero graph breaks, because the highlight head's GRU is
  traced with ``torch._dynamo.config.allow_rnn`` (patched around each call, not set globally). Tested with
  dynamo's ``explain`` and parity.

What issue #5 still asks for beyond this (CUDA-graph capture per bucket, a persistent GRU kernel, GPU
timings) is not here yet.
"""

from __future__ import annotations

import copy
import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from kernels.modules import TritonConvolutionalBlocks
from reference import LDDETR

from .checkpoint import load_checkpoint

HALF = (torch.bfloat16, torch.float16)


class Engine(nn.Module):
    """Inference-only wrapper around a transformed reference model (see module docstring)."""

    def __init__(self, model: LDDETR, *, dtype: torch.dtype = torch.float32, buckets: tuple[int, ...] = (),
                 run: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.run = run if run is not None else model  # the callable forward (a compiled wrapper or the model)
        self.cfg = model.cfg
        self.dtype = dtype
        self.buckets = tuple(sorted(buckets))
        super().train(False)

    def train(self, mode: bool = True) -> "Engine":
        if mode:
            raise RuntimeError("the engine is inference-only; train the reference model (python -m engine.train)")
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def bucket_length(self, t: int) -> int:
        """The padded video length for a batch of length t: the smallest bucket >= t, else t."""
        return next((b for b in self.buckets if b >= t), t)

    @torch.inference_mode()
    def forward(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor) -> dict:
        """video (B or 1, T, Dv), video_mask (B or 1, T), text (B, N, Dt), text_mask (B, N) ->
        pred_logits (B, Q, 2), pred_spans (B, Q, 2), saliency_scores (B, T), video_mask (B, T) bool."""
        t = video.shape[1]
        length = self.bucket_length(t)
        if length > t:  # pad clips (zeros, masked out) up to the bucket
            video = F.pad(video, (0, 0, 0, length - t))
            video_mask = F.pad(video_mask.bool(), (0, length - t), value=False)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype in HALF)
        if self.run is self.model:  # eager: no dynamo config to patch
            with autocast:
                out = self.model(video, video_mask, text, text_mask)
        else:
            with autocast, torch._dynamo.config.patch(allow_rnn=True):
                out = self.run(video, video_mask, text, text_mask)
        mask = out["video_mask"][:, :t]
        return {"pred_logits": out["pred_logits"], "pred_spans": out["pred_spans"],
                "saliency_scores": out["saliency_scores"][:, :t], "video_mask": mask}


def _strip_training_state(model: LDDETR) -> None:
    """Drop what only training reads: momentum encoders and the Distill-Align queues."""
    model.momentum_video_encoder = None
    model.momentum_text_encoder = None
    da = model.distill_align
    d = da.vid_queue.shape[0]
    da.vid_queue = torch.empty(d, 0, device=da.vid_queue.device)
    da.txt_queue = torch.empty(d, 0, device=da.txt_queue.device)


def build(model_or_checkpoint: LDDETR | str | os.PathLike, *, device: str | torch.device | None = None,
          dtype: torch.dtype = torch.float32, kernels_backend: str = "auto",
          buckets: Iterable[int] | str | None = "auto", compile: str | None = None,
          compile_backend: str = "inductor") -> Engine:
    """An inference :class:`Engine` from a reference model (copied; the original is untouched) or a
    checkpoint written by ``engine.train``.

    ``dtype``: float32, or bfloat16/float16 (autocast). ``buckets``: "auto" (the preset's max video
    length on CUDA, none on CPU), None / () for none, or lengths to pad to. ``compile``: None, "decoder"
    (the Loop Decoder) or "model" (the whole forward), each with ``fullgraph=True``.
    """
    if compile not in (None, "decoder", "model"):
        raise ValueError(f"compile must be None, 'decoder' or 'model', got {compile!r}")
    if dtype not in (torch.float32,) + HALF:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        model, _ = load_checkpoint(model_or_checkpoint)
    elif isinstance(model_or_checkpoint, LDDETR):
        model = copy.deepcopy(model_or_checkpoint)
    else:
        raise TypeError(f"build expects an LDDETR or a checkpoint path, got {type(model_or_checkpoint).__name__}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval().requires_grad_(False)
    _strip_training_state(model)
    model.to(device)
    kernels.apply(model, kernels_backend)
    for m in model.modules():
        if isinstance(m, TritonConvolutionalBlocks):
            m.fold_bn_torch = True
    if buckets == "auto":
        max_len = model.cfg.max_video_len
        buckets = (max_len,) if device.type == "cuda" and max_len else ()
    buckets = tuple(int(b) for b in (buckets or ()))
    if model.cfg.max_video_len and any(b > model.cfg.max_video_len for b in buckets):
        raise ValueError(f"buckets {buckets} exceed the model's max video length {model.cfg.max_video_len}")
    run = None
    if compile == "decoder":
        model.loop_decoder = torch.compile(model.loop_decoder, fullgraph=True, dynamic=not buckets,
                                           backend=compile_backend)
    elif compile == "model":
        run = torch.compile(model, fullgraph=True, dynamic=not buckets, backend=compile_backend)
    return Engine(model, dtype=dtype, buckets=buckets, run=run)
