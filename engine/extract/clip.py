"""CLIP ViT-B/32 image features per clip and per-token text features, as moment_detr's ``run_on_video``.

``CLIPExtractor(name_or_dir)`` wraps ``transformers.CLIPModel.from_pretrained`` (a local folder, or a name
the Hugging Face cache resolves on this machine; nothing is downloaded unless the user's own HF setup
does it) and reproduces moment_detr ``run_on_video/data_utils.py`` (``ClipFeatureExtractor``):

| step | what | moment_detr source |
| --- | --- | --- |
| frames | one frame per clip: ffmpeg ``fps=1/clip_length`` (see ``engine.extract.decode``) | ``VideoLoader(framerate=1/2)`` |
| resize | short side -> 224, long side -> ``int(long * 224 / short)``, bicubic (swscale in the decoder; ``resize_center_crop`` for frames of any other size) | ``_get_output_dim``, ffmpeg ``scale`` |
| crop | centre 224 x 224 at ``x = int((W - 224) / 2)``, ``y = int((H - 224) / 2)`` | ``cmd.crop`` |
| normalise | ``(x / 255 - mean) / (std + 1e-8)``, mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258, 0.27577711), RGB | ``Preprocessing`` |
| image feature | ``get_image_features`` (pooled CLS -> visual projection), 512-d, not normalised | ``encode_image`` |
| text tokens | ``[SOT] + BPE(query)[:30] + [EOT]`` (at most 32 tokens), no padding tokens kept | ``clip.tokenize(max_valid_length=32)`` |
| text feature | ``last_hidden_state`` after the final layer norm, one 512-d row per token, not normalised | ``encode_text(...)["last_hidden_state"][:valid_len]`` |

L2 normalisation and TEF are applied later, by the checkpoint's feature contract (``engine.features``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .slowfast import resize_center_crop, scaled_size

__all__ = ["CLIPError", "CLIPExtractor", "CLIP_MEAN", "CLIP_STD", "normalize_clip", "MAX_TEXT_TOKENS"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TEXT_TOKENS = 32  # moment_detr tokenize(max_valid_length=32): SOT + 30 BPE tokens + EOT


class CLIPError(ValueError):
    """Unusable CLIP weights or input (one line naming the folder, key or shape)."""


def normalize_clip(frames: Tensor) -> Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) fp32 ``(x / 255 - mean) / (std + 1e-8)`` (moment_detr ``Preprocessing``)."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / (std + 1e-8)


class CLIPExtractor:
    """``ex.image(frames) -> (N, 512)``, ``ex.text(queries) -> [(L_i, 512)]``, fp32 on the CPU.

    model: a local folder written by ``save_pretrained`` (or holding ``openai/clip-vit-base-patch32``), or a
    name the local Hugging Face cache resolves. device: None = CUDA when available. batch_size: frames or
    queries per forward. The tokenizer is read from the same folder/name.
    """

    clip_seconds = 2.0  # one frame per clip; the clip length is the caller's (fps = 1 / clip_length)

    def __init__(self, model: str | os.PathLike = "openai/clip-vit-base-patch32",
                 device: str | torch.device | None = None, batch_size: int = 60, local_files_only: bool = True):
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError:
            raise CLIPError("CLIP features need transformers: pip install 'ld-detr[video]'") from None
        if not isinstance(batch_size, int) or batch_size < 1:
            raise CLIPError(f"CLIP batch_size must be a positive integer, got {batch_size!r}")
        self.weights = str(model)
        try:
            self.model = CLIPModel.from_pretrained(self.weights, local_files_only=local_files_only)
            self.tokenizer = CLIPTokenizer.from_pretrained(self.weights, local_files_only=local_files_only)
        except Exception as e:  # noqa: BLE001 - OSError for a missing folder/name, ValueError for a bad config
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CLIPError(f"CLIP model {self.weights!r}: cannot load ({type(e).__name__}: {first}); pass a "
                            f"local folder holding openai/clip-vit-base-patch32") from None
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.model.eval().requires_grad_(False).to(self.device)
        self.batch_size = batch_size
        self.size = int(self.model.config.vision_config.image_size)  # 224 for ViT-B/32
        self.dim = int(self.model.config.projection_dim)  # image feature dim (512)
        self.text_dim = int(self.model.config.text_config.hidden_size)  # token feature dim (512)
        self.name = "clip"

    def manifest(self) -> dict:
        return {"name": "clip", "weights": self.weights, "dim": self.dim, "text_dim": self.text_dim,
                "image_size": self.size, "max_text_tokens": MAX_TEXT_TOKENS}

    def scaled_size(self, height: int, width: int) -> tuple[int, int]:
        """moment_detr's scaled (H', W') for a (height, width) picture; the decoder resizes to it."""
        return scaled_size(height, width, self.size)

    def preprocess(self, frames: Tensor | np.ndarray) -> Tensor:
        """(N, H, W, 3) uint8 RGB -> (N, 3, 224, 224) fp32: resize (unless already scaled), crop, normalise."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        if not isinstance(frames, Tensor) or frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            got = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, Tensor) else type(frames).__name__
            raise CLIPError(f"CLIP frames must be uint8 (N, H, W, 3) RGB, got {got}")
        if frames.shape[0] == 0:
            raise CLIPError("CLIP got zero frames (an empty or zero-length video)")
        return normalize_clip(resize_center_crop(frames, self.size))

    @torch.no_grad()
    def image(self, frames: Tensor | np.ndarray) -> Tensor:
        """(N, H, W, 3) uint8 RGB, one frame per clip -> (N, dim) fp32 image features."""
        x = self.preprocess(frames)
        out = []
        for b in x.split(self.batch_size):
            feats = self.model.get_image_features(pixel_values=b.to(self.device))
            feats = getattr(feats, "pooler_output", feats)  # transformers >= 5 returns a model output
            out.append(feats.float().cpu())
        return torch.cat(out)

    def tokenize(self, queries: Sequence[str]) -> list[list[int]]:
        """Token ids per query: SOT + BPE[:30] + EOT (moment_detr ``tokenize(max_valid_length=32)``)."""
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise CLIPError(f"query {i}: must be a non-empty string, got {q!r}")
        enc = self.tokenizer(list(queries), truncation=True, max_length=MAX_TEXT_TOKENS, padding=False)
        return [list(ids) for ids in enc["input_ids"]]

    @torch.no_grad()
    def text(self, queries: Sequence[str]) -> list[Tensor]:
        """Queries -> per query (L_i <= 32, text_dim) fp32 token features (last_hidden_state of the valid tokens)."""
        if len(queries) == 0:
            raise CLIPError("no queries given")
        ids = self.tokenize(queries)
        out: list[Tensor] = []
        for b0 in range(0, len(ids), self.batch_size):
            batch = ids[b0:b0 + self.batch_size]
            n = max(len(t) for t in batch)
            input_ids = torch.zeros(len(batch), n, dtype=torch.long)
            mask = torch.zeros(len(batch), n, dtype=torch.long)
            for i, t in enumerate(batch):
                input_ids[i, : len(t)] = torch.tensor(t)
                mask[i, : len(t)] = 1
            hidden = self.model.text_model(input_ids=input_ids.to(self.device),
                                           attention_mask=mask.to(self.device)).last_hidden_state  # (B, n, d)
            out.extend(hidden[i, : len(t)].float().cpu() for i, t in enumerate(batch))
        return out
