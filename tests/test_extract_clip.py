"""engine.extract.clip: moment_detr's CLIP preprocessing step by step, image/text features, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch


from engine.extract.clip import CLIP_MEAN, CLIP_STD, MAX_TEXT_TOKENS, CLIPError, CLIPExtractor, normalize_clip


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return CLIPExtractor(tiny_clip_dir, device="cpu", batch_size=3)


def test_normalize_hand_computed():
    frames = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 2, 2, 3)
    got = normalize_clip(frames)
    assert got.shape == (1, 3, 2, 2) and got.dtype == torch.float32
    want = [(0 - CLIP_MEAN[0]) / (CLIP_STD[0] + 1e-8), (1 - CLIP_MEAN[1]) / (CLIP_STD[1] + 1e-8),
            (0.2 - CLIP_MEAN[2]) / (CLIP_STD[2] + 1e-8)]
    torch.testing.assert_close(got[0, :, 0, 0], torch.tensor(want), rtol=0, atol=1e-6)


def test_scaled_size_and_crop(clip):
    assert clip.size == 32
    assert clip.scaled_size(48, 64) == (32, 42) and clip.scaled_size(64, 48) == (42, 32)
    assert clip.scaled_size(360, 640) == (32, 56)
    # frames already at the scaled size are only cropped: x0 = int((42 - 32) / 2) = 5
    frames = torch.randint(0, 256, (2, 32, 42, 3), dtype=torch.uint8)
    torch.testing.assert_close(clip.preprocess(frames), normalize_clip(frames[:, :, 5:37]), rtol=0, atol=0)
    tall = torch.randint(0, 256, (1, 45, 32, 3), dtype=torch.uint8)  # y0 = int((45 - 32) / 2) = 6
    torch.testing.assert_close(clip.preprocess(tall), normalize_clip(tall[:, 6:38]), rtol=0, atol=0)
    other = torch.randint(0, 256, (1, 48, 64, 3), dtype=torch.uint8)  # resized first
    assert clip.preprocess(other).shape == (1, 3, 32, 32)


def test_image_features_batch_invariant_deterministic(clip):
    frames = torch.randint(0, 256, (7, 32, 40, 3), dtype=torch.uint8)
    got = clip.image(frames)
    assert got.shape == (7, clip.dim) and got.dtype == torch.float32 and clip.dim == 16
    with torch.no_grad():
        ref = clip.model.get_image_features(pixel_values=clip.preprocess(frames))
    torch.testing.assert_close(got, getattr(ref, "pooler_output", ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clip.image(frames), got, rtol=0, atol=0)
    torch.testing.assert_close(clip.image(frames[4:5]), got[4:5], rtol=1e-5, atol=1e-5)


def test_text_tokens_and_features(clip):
    ids = clip.tokenize(["a man runs", "z" * 60])
    sot, eot = clip.tokenizer.bos_token_id, clip.tokenizer.eos_token_id
    assert ids[0][0] == sot and ids[0][-1] == eot and len(ids[0]) == 2 + len("amanruns")
    assert len(ids[1]) == MAX_TEXT_TOKENS and ids[1][-1] == eot  # SOT + 30 BPE + EOT
    feats = clip.text(["a man runs", "z" * 60, "hi", "dogs bark loudly"])  # two batches of 3
    assert [tuple(f.shape) for f in feats] == [(10, 24), (32, 24), (4, 24), (16, 24)]
    for q, f in zip(["hi", "a man runs"], [feats[2], feats[0]]):  # padding in a batch changes nothing
        torch.testing.assert_close(clip.text([q])[0], f, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # last_hidden_state after the final layer norm
        ref = clip.model.text_model(input_ids=torch.tensor([ids[0]])).last_hidden_state[0]
    torch.testing.assert_close(feats[0], ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs(clip, tmp_path):
    with pytest.raises(CLIPError, match="uint8"):
        clip.image(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(CLIPError, match="non-empty"):
        clip.text(["ok", "  "])
    with pytest.raises(CLIPError, match="cannot load") as e:
        CLIPExtractor(tmp_path / "nothing_here")
    assert "\n" not in str(e.value)
