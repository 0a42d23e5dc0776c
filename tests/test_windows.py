"""engine.windows (pure) and windowed Predictor.predict: one window == the single pass, stitching is a mean."""

from __future__ import annotations

import numpy as np
import pytest
from extract_helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.features import FeatureSpec
from engine.predict import Predictor
from engine.windows import default_window, merge_moments, merge_saliency, split_windows


def test_split_windows_hand_computed():
    assert split_windows(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert split_windows(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    assert split_windows(11, 4, 4) == [(0, 4), (4, 8), (7, 11)]  # last window aligned to the end
    assert split_windows(5, 8) == [(0, 5)] and split_windows(8, 8) == [(0, 8)]
    assert split_windows(9, 8) == [(0, 8), (1, 9)]
    with pytest.raises(ValueError, match="stride 5 exceeds the window 4"):
        split_windows(10, 4, 5)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        split_windows(10, 0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), window=st.integers(1, 80), frac=st.floats(0.01, 1.0))
def test_split_windows_cover_every_clip(n, window, frac):
    stride = max(1, int(window * frac))
    ranges = split_windows(n, window, stride)
    covered = np.zeros(n, bool)
    for s, e in ranges:
        assert 0 <= s < e <= n and e - s == min(window, n)
        covered[s:e] = True
    assert covered.all() and ranges[-1][1] == n
    assert all(b[0] - a[0] <= stride for a, b in zip(ranges, ranges[1:]))


def test_merge_saliency_mean_in_overlaps():
    got = merge_saliency(6, [(0, 4), (2, 6)], [[1, 2, 3, 4], [10, 20, 30, 40]])
    assert got == [1, 2, 6.5, 12, 30, 40]
    with pytest.raises(ValueError, match="expected 4"):
        merge_saliency(6, [(0, 4), (2, 6)], [[1, 2, 3], [1, 2, 3, 4]])


def test_merge_moments_shift_sort_nms():
    w0 = [[0.0, 4.0, 0.9], [2.0, 6.0, 0.5]]
    w1 = [[0.0, 4.0, 0.8], [6.0, 8.0, 0.95]]  # window 1 starts at 2 s: [2, 6] (dup of w0[1]) and [8, 10]
    got = merge_moments([w0, w1], [0.0, 2.0], duration=9.0, nms_thd=0.7, max_moments=10)
    assert got == [[8.0, 9.0, 0.95], [0.0, 4.0, 0.9], [2.0, 6.0, 0.8]]  # [2, 6] @0.5 suppressed; clamped to 9 s
    assert len(merge_moments([w0, w1], [0.0, 2.0], nms_thd=-1, max_moments=3)) == 3


@pytest.fixture(scope="module")
def predictor():
    model = tiny_model(12 + 2, 8, max_v_l=20)
    spec = FeatureSpec(video_dirs=["clip_features"], video_dims=[12], text_dim=8, max_v_l=20)
    return Predictor(model, spec, device="cpu", kernels_backend="torch")


def test_one_window_is_the_single_pass(predictor):
    rng = np.random.default_rng(0)
    video, tokens = rng.normal(size=(20, 12)), [rng.normal(size=(5, 8)), rng.normal(size=(3, 8))]
    once = predictor._predict_once(video, tokens)
    assert predictor.predict(video, tokens) == once  # 20 clips fit the default window (max_v_l)
    assert predictor.predict(video, tokens, window=20, stride=3) == once


def test_long_video_windows_merged(predictor):
    rng = np.random.default_rng(1)
    video, tokens = rng.normal(size=(47, 12)), [rng.normal(size=(4, 8))]
    got = predictor.predict({"clip_features": video}, tokens, window=20, stride=10)
    ranges = split_windows(47, 20, 10)
    assert ranges == [(0, 20), (10, 30), (20, 40), (27, 47)]
    per = [predictor._predict_once(video[s:e], tokens)[0] for s, e in ranges]
    assert len(got[0]["saliency"]) == 47
    assert got[0]["saliency"] == merge_saliency(47, ranges, [p["saliency"] for p in per])
    assert got[0]["saliency"][:10] == per[0]["saliency"][:10]  # clips only window 0 covers
    rows = got[0]["windows"]
    assert len(rows) == 10 and all(0 <= r[0] <= r[1] <= 94 for r in rows)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    assert rows[0][2] == max(r[2] for p in per for r in p["windows"])
    with pytest.raises(ValueError, match="exceeds the model's max_v_l 20"):
        predictor.predict(video, tokens, window=30)


def test_uncapped_model_gets_the_default_window():
    assert default_window(2.0) == 75 and default_window(1.0) == 150
    model = tiny_model(6 + 2, 8, max_v_l=-1, clip_length=1.0)
    spec = FeatureSpec(video_dirs=["clip_features"], video_dims=[6], text_dim=8, max_v_l=-1, clip_length=1.0)
    pred = Predictor(model, spec, device="cpu", kernels_backend="torch")
    rng = np.random.default_rng(2)
    video, tokens = rng.normal(size=(160, 6)), [rng.normal(size=(3, 8))]
    got = pred.predict(video, tokens)[0]  # 160 clips > 150: windows [0, 150), [10, 160)
    first = pred._predict_once(video[:150], tokens)[0]
    assert len(got["saliency"]) == 160 and got["saliency"][:10] == first["saliency"][:10]
    assert all(0 <= st <= ed <= 160 for st, ed, _ in got["windows"])
