"""Prediction and checkpoints never answer wrongly in silence: checksummed checkpoints, NaN never written to a
jsonl, the dataset's own post-processing, duration checks, long videos cut with a warning, one-line CLI errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from engine import CheckpointError, load_checkpoint, save_checkpoint
from engine.atomic import save_jsonl
from engine.checkpoint import read_checkpoint
from engine.data import FeatureSpec
from engine.predict import Predictor, main
from reference import LDDETR, LDDETRConfig

V, T = (8, 4), 6  # video dims per modality, text dim


def _model(**kw) -> LDDETR:
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=sum(V) + 2, t_feat_dim=T, queue_length=8,
                              dim_feedforward=64, num_v2t_encoder_layers=1, num_encoder1_layers=1,
                              num_convolutional_blocks=1, num_encoder2_layers=1, **kw)
    return LDDETR(cfg).eval()


def _spec(model: LDDETR) -> FeatureSpec:
    return FeatureSpec(video_dims=list(V), text_dim=T, clip_length=model.cfg.clip_length, max_v_l=model.cfg.max_v_l)


def _video(n: int, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    return {"slowfast_features": g.standard_normal((n, V[0])), "clip_features": g.standard_normal((n, V[1]))}


def _tokens(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((5, T))


def test_checkpoint_with_flipped_bytes_is_refused(tmp_path):
    path = save_checkpoint(_model(), tmp_path / "ckpt.pt", epoch=1)
    raw = bytearray(path.read_bytes())
    ckpt = torch.load(path, weights_only=True)
    name = max(ckpt["model"], key=lambda k: ckpt["model"][k].numel())  # the biggest tensor's bytes
    needle = ckpt["model"][name].contiguous().view(-1).view(torch.uint8)[:256].numpy().tobytes()
    at = bytes(raw).find(needle)
    assert at > 0
    for i in range(at + 64, at + 128):  # 64 flipped bytes inside a weight
        raw[i] ^= 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{bad}: checksum mismatch"):
        load_checkpoint(bad)
    load_checkpoint(path)  # the intact copy loads


def test_checkpoint_without_checksum_loads_with_a_warning(tmp_path):
    path = save_checkpoint(_model(), tmp_path / "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["checksum"]
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match=r"old\.pt: checkpoint has no checksum"):
        read_checkpoint(tmp_path / "old.pt")


def test_nan_is_never_written_to_a_jsonl(tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text("old\n")
    with pytest.raises(ValueError, match=r"record qid 2 has NaN/inf values .* nothing was written"):
        save_jsonl([{"qid": 1, "s": [0.5]}, {"qid": 2, "s": [float("nan")]}], out)
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]


@pytest.mark.parametrize("duration", [-3.0, 0.0, float("nan"), float("inf"), "long"])
def test_predictor_refuses_bad_durations(duration):
    model = _model()
    pred = Predictor(model, _spec(model), device="cpu", backend="torch")
    with pytest.raises(ValueError, match=r"predict: duration must be"):
        pred.predict(_video(10), [_tokens()], duration=duration)


def test_long_video_is_scored_in_windows_never_silently_rescaled():
    """Longer than max_v_l: scored in overlapping windows (engine.windows), windows in seconds of the whole
    video, one saliency per clip; the single-pass cut (``_predict_once``) still warns."""
    model = _model(max_v_l=12)
    pred = Predictor(model, _spec(model), device="cpu", backend="torch")
    video = _video(30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        long = pred.predict(video, [_tokens()])
    assert len(long[0]["saliency"]) == 30
    assert all(0.0 <= w[0] < w[1] <= 60.0 for w in long[0]["windows"])
    with pytest.warns(UserWarning, match=r"30 clips, more than the model's max_v_l=12: only its first 24 s"):
        cut = pred._predict_once(video, [_tokens()], duration=60.0)
    assert max(w[1] for w in cut[0]["windows"]) <= 24.0


@pytest.mark.parametrize("dataset, clamp, saliency", [("qvhighlights", 150.0, True), ("tacos", None, False),
                                                      ("charades", 150.0, False)])
def test_predictor_uses_the_checkpoints_dataset(dataset, clamp, saliency):
    model = _model(max_v_l=-1)
    # TACoS: 200 clips of 2 s = 400 s (windowed), past QVHighlights' 150 s clamp; the others one 150-s window whose
    # spans reach past its end, so the clamp decides the edge
    n = 200 if dataset == "tacos" else 75
    with torch.no_grad():  # spans reach the video's end: the clamp decides the edge
        for name, m in model.named_modules():
            if name.endswith("span_embed3"):
                m.bias.fill_(8.0)
    pred = Predictor(model, _spec(model), dataset=dataset, device="cpu", backend="torch")
    res = pred.predict(_video(n), [_tokens()])[0]
    end = max(w[1] for w in res["windows"])
    assert (end <= clamp) if clamp else end > 150.0
    assert (res["saliency"] is not None) == saliency


def test_predictor_takes_dtype_names():
    model = _model()
    pred = Predictor(model, _spec(model), device="cpu", backend="torch", dtype="bf16")
    assert pred.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype must be one of \['fp32', 'bf16', 'fp16'\]"):
        Predictor(model, _spec(model), device="cpu", backend="torch", dtype="fp8")


def test_predict_cli_one_line_errors(tmp_path, capsys):
    ckpt = save_checkpoint(_model(), tmp_path / "ckpt.pt", feature_contract=_spec(_model()).to_dict())
    (tmp_path / "file").write_text("x")
    assert main(["--ckpt", str(ckpt), "--data-root", str(tmp_path), "--out", str(tmp_path / "file" / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'file' / 'p.jsonl'}: {tmp_path / 'file'} is a file") and \
        len(err.splitlines()) == 1
    if not torch.cuda.is_available():
        assert main(["--ckpt", str(ckpt), "--data-root", str(tmp_path), "--out", str(tmp_path / "p.jsonl"),
                     "--device", "cuda"]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(ckpt), "--data-root", str(tmp_path), "--out", str(tmp_path / "p.jsonl"), "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_predict_loader_scales_capped_videos_by_what_the_model_saw():
    """The dataset path (``engine.predict --data-root``): a 300 s video read as its first 75 clips is scaled by
    150 s, not 300 s, and named in a warning; an uncapped model keeps the duration."""
    from engine.train_guard import seen_meta

    meta = [{"qid": 1, "duration": 300.0}, {"qid": 2, "duration": 150.0}, {"qid": 3, "duration": 40.0}]
    cut: list = []
    out = seen_meta(meta, [75, 75, 20], LDDETRConfig.preset("qvhighlights"), cut)
    assert [m["duration"] for m in out] == [150.0, 150.0, 40.0] and cut == [1]
    assert seen_meta(meta, [75, 75, 20], LDDETRConfig.preset("tacos"), []) == meta
