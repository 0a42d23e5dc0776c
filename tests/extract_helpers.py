"""Test-only builders for the video tests: a tiny random-weight CLIP folder and synthetic videos (PyAV)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

TINY_CLIP = dict(projection_dim=16, text_hidden=24, vision_hidden=32, image_size=32, patch_size=8)


def make_tiny_clip(folder: Path) -> Path:
    """A random CLIP (tiny widths, 32-px images) plus a character-level CLIP tokenizer, saved to ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    t = TINY_CLIP
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'")
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=t["text_hidden"], intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, vocab_size=len(vocab),
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=t["vision_hidden"], intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, image_size=t["image_size"], patch_size=t["patch_size"]),
        projection_dim=t["projection_dim"])
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


def pattern(i: int, h: int, w: int) -> np.ndarray:
    """Frame i: a moving gradient (distinct, smooth enough to survive compression)."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1) + 5 * i) % 256
    g = (y * 255 // max(h - 1, 1) + 3 * i) % 256
    b = np.full_like(r, (17 * i) % 256)
    return np.stack([r, g, b], -1).astype(np.uint8)


def write_video(path: Path, n_frames: int, fps: float, width: int, height: int, *, audio: bool = False,
                codec: str = "mpeg4", times: list[float] | None = None, rotate: int | None = None) -> Path:
    """A synthetic video; ``times`` (seconds) gives a variable frame rate; ``audio`` adds an AAC track."""
    import av

    with av.open(str(path), "w") as c:
        if times is None:
            s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        else:
            s = c.add_stream(codec, rate=1000)
            s.codec_context.time_base = Fraction(1, 1000)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        if rotate is not None:
            s.set_display_rotation(rotate)  # counter-clockwise, read back as frame.rotation
        a = c.add_stream("aac", rate=8000) if audio else None
        for i in range(n_frames):
            fr = av.VideoFrame.from_ndarray(pattern(i, height, width), format="rgb24")
            if times is not None:
                fr.pts, fr.time_base = int(round(times[i] * 1000)), Fraction(1, 1000)
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            n = int(8000 * n_frames / fps)
            for k in range(0, n, 1024):
                af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                af.sample_rate, af.pts = 8000, k
                for p in a.encode(af):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path


def write_zero_length(path: Path) -> Path:
    """An AVI with a video stream and no frames."""
    import av

    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=25)
    s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
    c.start_encoding()
    c.close()
    return path


def write_audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=8000)
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate, af.pts = 8000, 0
        for p in list(a.encode(af)) + list(a.encode()):
            c.mux(p)
    return path


def tiny_model(v_feat_dim: int, t_feat_dim: int, **overrides):
    """A small-width LD-DETR (fast on CPU) for prediction tests."""
    import torch

    from reference import LDDETR, LDDETRConfig

    kw = dict(v_feat_dim=v_feat_dim, t_feat_dim=t_feat_dim, queue_length=16, dim_feedforward=128,
              num_convolutional_blocks=1, num_encoder1_layers=1, num_encoder2_layers=1, num_v2t_encoder_layers=1,
              num_decoder_layers=1)
    kw.update(overrides)
    torch.manual_seed(0)
    return LDDETR(LDDETRConfig.preset("qvhighlights", **kw)).eval()
