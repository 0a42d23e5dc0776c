"""SlowFast 8x8 R50 clip features (2304-d) from decoded frames, with HERO_Video_Feature_Extractor's recipe.

``SlowFastExtractor(weights)(frames)``: RGB uint8 frames ``(N, H, W, 3)`` decoded at 30 fps from t = 0 ->
``(ceil(N / 60), 2304)`` fp32, one row per 2-s clip: the pooled slow (2048) || fast (256) pathway features
before the Kinetics projection, the SlowFast half of the moment-retrieval datasets' features (QVHighlights,
Charades-STA, ...: moment_detr's ``slowfast_features``, extracted with linjieli222/HERO_Video_Feature_Extractor).

Why not pytorchvideo: it needs ``torchvision``, which does not load against this project's CPU torch wheel
(torch 2.13); the only working pair here is a 5.5 GB CUDA ``torch 2.14.1 / torchvision 0.29.1`` venv. So the
network is our own (``engine.extract.slowfast_net``), loading the public checkpoint under pytorchvideo's own
state-dict names and checked against pytorchvideo's output (``shared/data/slowfast_oracle``, bit-exact on CPU).

Weights (nothing is ever downloaded; pass a local file):

- PySlowFast's Caffe2 ``SLOWFAST_8x8_R50.pkl`` (https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/kinetics400/
  SLOWFAST_8x8_R50.pkl): the checkpoint HERO, hence the datasets' ``slowfast_features``, used. Use this one for
  an LD-DETR checkpoint trained on QVHighlights / Charades features. Renamed on load (``slowfast_convert``).
- pytorchvideo's ``SLOWFAST_8x8_R50.pyth`` (https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/
  SLOWFAST_8x8_R50.pyth; its ``model_state`` loads strictly, no renaming), a bare state_dict (``.pt``/``.pth``)
  or a ``.safetensors`` with the same names. The ``.pyth`` is another training run of the same network: its
  features have the same shape but live in a different space from the datasets' (fine for training anew).

Preprocessing (HERO ``extract_feature/{video_loader,preprocessing,extract}.py``, ``--clip_len 2``,
``configs/Kinetics/c2/extract_SLOWFAST_8x8_R50.yaml``):

| step | what | HERO source |
| --- | --- | --- |
| frames | decoded at 30 fps from t = 0 (the caller decodes: ffmpeg ``fps=30`` in HERO) | ``--target_framerate 30`` |
| resize | short side -> 224, long side -> ``int(long * 224 / short)``; bicubic, antialiased, on RGB, rounded to uint8 (HERO: ffmpeg ``scale``, swscale bicubic; frames already at that size are not resampled) | ``VideoLoader._get_output_dim`` |
| crop | centre 224 x 224 at ``x = int((W - 224) / 2)``, ``y = int((H - 224) / 2)`` | ``cmd.crop`` |
| pad | frames to a multiple of 30 by repeating the last frame; then seconds to a multiple of 2 by repeating the last second | ``_pad_frames``, ``_pad_clips`` (``tile``) |
| clips | non-overlapping 60-frame (2-s) clips -> ``n_clips = ceil(N / 60)`` | ``clips.view(-1, 60, ...)`` |
| fast pathway | 32 frames at ``clamp(linspace(0, 63 * s, 32), 0, 59).long()`` of each clip, ``s = floor(source fps) / 30`` (1 unless ``source_fps`` is given) | ``get_start_end_idx`` + ``temporal_sampling`` (NUM_FRAMES 32, SAMPLING_RATE 2) |
| slow pathway | 8 of the 32 at ``linspace(0, 31, 8).long()`` = 0, 4, 8, 13, 17, 22, 26, 31 (alpha = 4) | ``pack_pathway_output`` |
| normalise | ``(x / 255 - 0.45) / (0.225 + 1e-8)`` per channel, RGB order, layout (B, 3, T, 224, 224) | ``Normalize`` in ``perform_test`` |
| network | SlowFast R50 8x8, eval, fp32 (TF32 off on the GPU); feature = per-pathway global average, slow first | ``ResNetBasicHead(last_fc=True)`` |

Clips are independent: calling on consecutive chunks of whole clips (multiples of ``frames_per_clip`` frames)
and concatenating equals one call, so long videos can be streamed.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .slowfast_convert import convert_c2_state, read_c2_pickle
from .slowfast_net import SlowFastConfig, SlowFastNet, init_random_

__all__ = ["SlowFastError", "SlowFastExtractor", "clip_frame_indices", "resize_center_crop", "read_state_dict",
           "load_weights_"]

FPS = 30
CLIP_SECONDS = 2
SAMPLING_RATE = 2  # HERO cfg DATA.SAMPLING_RATE: the fast clip spans fast_frames * 2 frames at the source rate
MEAN, STD = 0.45, 0.225


class SlowFastError(ValueError):
    """Unusable SlowFast input or weights (the message is one line naming the file, key or shape)."""


# --------------------------------------------------------------------------------------------- sampling

def clip_frame_indices(n_frames: int, *, fast_frames: int = 32, source_fps: float | None = None) -> Tensor:
    """Which input frame each fast-pathway frame of each clip reads, HERO's padding and sampling included.

    n_frames: frames decoded at 30 fps; source_fps: the video's own rate (HERO scales the sampled window by
    ``floor(source_fps) / 30``); None = 30. Returns LongTensor (ceil(n_frames / 60), fast_frames).
    """
    if n_frames < 1:
        raise SlowFastError(f"SlowFast needs at least one frame, got {n_frames}")
    src = FPS if source_fps is None else source_fps
    if not (math.isfinite(src) and src >= 1):
        raise SlowFastError(f"SlowFast source_fps must be a finite number >= 1, got {source_fps}")
    idx = torch.arange(n_frames)
    n_sec = -(-n_frames // FPS)
    idx = torch.cat([idx, idx[-1:].expand(n_sec * FPS - n_frames)]).view(n_sec, FPS)  # pad: repeat last frame
    n_clip = -(-n_sec // CLIP_SECONDS)
    idx = torch.cat([idx, idx[-1:].expand(n_clip * CLIP_SECONDS - n_sec, FPS)])  # pad: repeat last second
    idx = idx.reshape(n_clip, FPS * CLIP_SECONDS)  # (n_clips, 60)
    span = fast_frames * SAMPLING_RATE * math.floor(src) / FPS  # HERO get_start_end_idx(60, span, 0, 1)
    pos = torch.linspace(0, span - 1, fast_frames).clamp(0, FPS * CLIP_SECONDS - 1).long()
    return idx[:, pos]


def slow_positions(fast_frames: int, alpha: int) -> Tensor:
    """HERO pack_pathway_output: slow frames = fast[linspace(0, T - 1, T // alpha).long()]."""
    return torch.linspace(0, fast_frames - 1, fast_frames // alpha).long()


# --------------------------------------------------------------------------------------------- pixels

def scaled_size(h: int, w: int, size: int) -> tuple[int, int]:
    """HERO ``_get_output_dim``: short side -> size, long side -> int(long * size / short). Returns (H', W')."""
    return (int(h * size / w), size) if h >= w else (size, int(w * size / h))


def resize_center_crop(frames: Tensor, size: int, chunk: int = 8) -> Tensor:
    """(n, H, W, 3) uint8 -> (n, size, size, 3) uint8: HERO's short-side resize then centre crop.

    Resamples ``chunk`` frames at a time (a 1080p frame is 25 MB in fp32)."""
    n, h, w, _ = frames.shape
    sh, sw = scaled_size(h, w, size)
    y0, x0 = int((sh - size) / 2), int((sw - size) / 2)
    if (sh, sw) == (h, w):
        return frames[:, y0:y0 + size, x0:x0 + size]
    out = []
    for x in frames.split(chunk):
        x = x.permute(0, 3, 1, 2).float()  # (c, 3, H, W)
        x = F.interpolate(x, size=(sh, sw), mode="bicubic", antialias=True, align_corners=False)
        x = x[:, :, y0:y0 + size, x0:x0 + size].round_().clamp_(0, 255).to(torch.uint8)
        out.append(x.permute(0, 2, 3, 1))  # (c, size, size, 3)
    return torch.cat(out)


def normalize(frames: Tensor) -> Tensor:
    """(B, T, S, S, 3) uint8 -> (B, 3, T, S, S) fp32, HERO's ``(x / 255 - 0.45) / (0.225 + 1e-8)``."""
    x = frames.permute(0, 4, 1, 2, 3).float() / 255.0
    return (x - MEAN) / (STD + 1e-8)


# --------------------------------------------------------------------------------------------- weights

def read_state_dict(path: str | os.PathLike, config: SlowFastConfig | None = None) -> dict[str, Tensor]:
    """A SlowFast state_dict from ``.pyth``/``.pt``/``.pth`` (``model_state`` or bare), ``.safetensors``, or
    PySlowFast's Caffe2 ``.pkl`` (renamed by ``engine.extract.slowfast_convert``; ``config`` checks its shapes)."""
    path = Path(path)
    if not path.is_file():
        raise SlowFastError(f"SlowFast weights: no file {path}")
    if path.suffix == ".pkl":
        try:
            return convert_c2_state(read_c2_pickle(path), config, source=f"Caffe2 weights {path}")
        except ValueError as e:
            raise SlowFastError(str(e)) from None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise SlowFastError(f"SlowFast weights {path}: unreadable ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and "model_state" in obj:
        obj = obj["model_state"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise SlowFastError(f"SlowFast weights {path}: not a state_dict (expected a dict of tensors, or a "
                            "pytorchvideo checkpoint with 'model_state')")
    return obj


def load_weights_(model: SlowFastNet, state: dict[str, Tensor], source: str = "weights") -> SlowFastNet:
    """Strict load under pytorchvideo's names; only BatchNorm ``num_batches_tracked`` may be absent."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        hint = " (PySlowFast names: pass its Caffe2 .pkl or pytorchvideo's .pyth)" if any(
            k.startswith(("s1.", "s2.", "head.")) for k in unexpected) else ""
        raise SlowFastError(
            f"SlowFast {source}: not a pytorchvideo SlowFast {model.config.name} state_dict: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}){hint}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise SlowFastError(f"SlowFast {source}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    full = {k: (state[k].to(own[k].dtype) if k in state else own[k]) for k in own}
    model.load_state_dict(full, strict=True)
    return model


@contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
    """fp32 convolutions on CUDA (cuDNN defaults to TF32, ~1e-3 off the fp32 features)."""
    if device.type != "cuda":
        yield
        return
    conv = torch.backends.cudnn.conv
    old = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = old


# --------------------------------------------------------------------------------------------- extractor

class SlowFastExtractor:
    """HERO-recipe SlowFast features: ``ex(frames) -> (n_clips, ex.dim)`` fp32 on the CPU.

    weights: a checkpoint path (see module docstring), or None together with ``test_config`` (deterministic
    random weights, tests only). device: None = CUDA when available, else CPU. batch_size: clips per forward.
    test_config: a ``SlowFastConfig`` or preset name (``"tiny"``, ``"tiny_deep"``): small widths and crops.
    """

    name = "slowfast_r50_8x8"
    fps = FPS
    clip_seconds = float(CLIP_SECONDS)
    frames_per_clip = FPS * CLIP_SECONDS

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 batch_size: int = 8, test_config: SlowFastConfig | str | None = None):
        if weights is None and test_config is None:
            raise SlowFastError("SlowFast needs weights: pass the path of pytorchvideo's SLOWFAST_8x8_R50.pyth "
                                "(random weights only with a test_config)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SlowFastError(f"SlowFast batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(test_config, str):
            try:
                test_config = SlowFastConfig.from_name(test_config)
            except ValueError as e:
                raise SlowFastError(str(e)) from None
        self.config = test_config or SlowFastConfig()
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.weights = None if weights is None else str(weights)
        model = SlowFastNet(self.config)
        if weights is None:
            init_random_(model, seed=0)
        else:
            load_weights_(model, read_state_dict(weights, self.config), source=f"weights {weights}")
        self.model = model.eval().to(self.device)
        self._slow_pos = slow_positions(self.config.fast_frames, self.config.alpha).to(self.device)

    @property
    def dim(self) -> int:
        return self.config.dim

    def n_clips(self, n_frames: int) -> int:
        return -(-n_frames // self.frames_per_clip)

    def scaled_size(self, height: int, width: int) -> tuple[int, int]:
        """HERO's scaled (H', W') for a (height, width) video. A decoder that scales to it itself (PyAV
        ``frame.to_ndarray(width=W', height=H', format="rgb24", interpolation="BICUBIC")``, swscale as HERO's
        ffmpeg) saves memory and skips our resize: only the centre crop is then applied."""
        return scaled_size(height, width, self.config.crop_size)

    def manifest(self) -> dict:
        """What produced the features (for an extraction manifest / cache key)."""
        return {"name": self.name, "weights": self.weights, "config": self.config.name, "dim": self.dim,
                "fps": self.fps, "clip_seconds": self.clip_seconds, "crop_size": self.config.crop_size}

    def __repr__(self) -> str:
        return (f"SlowFastExtractor(name={self.name!r}, config={self.config.name!r}, dim={self.dim}, "
                f"weights={self.weights!r}, device={str(self.device)!r})")

    @torch.no_grad()
    def __call__(self, frames: Tensor | np.ndarray, *, source_fps: float | None = None) -> Tensor:
        """frames (N, H, W, 3) uint8 RGB at 30 fps -> (ceil(N / 60), dim) fp32 CPU; see the module's table."""
        frames = self._check(frames)
        idx = clip_frame_indices(frames.shape[0], fast_frames=self.config.fast_frames, source_fps=source_fps)
        out = torch.empty(idx.shape[0], self.dim, dtype=torch.float32)
        size = self.config.crop_size
        with _no_tf32(self.device):
            for b0 in range(0, idx.shape[0], self.batch_size):
                sel = idx[b0:b0 + self.batch_size]  # (B, T)
                clips = torch.stack([resize_center_crop(frames[row].to(self.device), size) for row in sel])
                fast = normalize(clips)  # (B, 3, T, S, S)
                slow = fast.index_select(2, self._slow_pos)  # (B, 3, T / alpha, S, S)
                out[b0:b0 + sel.shape[0]] = self.model(slow, fast).float().cpu()
        return out

    def _check(self, frames: Tensor | np.ndarray) -> Tensor:
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        if not isinstance(frames, Tensor):
            raise SlowFastError(f"SlowFast frames must be a uint8 tensor (N, H, W, 3), got {type(frames).__name__}")
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise SlowFastError(f"SlowFast frames must be uint8 (N, H, W, 3) RGB, got {frames.dtype} "
                                f"{tuple(frames.shape)}")
        n, h, w, _ = frames.shape
        if n == 0:
            raise SlowFastError("SlowFast got zero frames (an empty or zero-length video)")
        if min(h, w) < 1:
            raise SlowFastError(f"SlowFast frames have an empty picture: {h}x{w}")
        return frames
