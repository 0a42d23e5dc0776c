"""engine.predict --video / Predictor.predict_video: == extract-then-predict, cache, CLIP-only long video, errors."""

from __future__ import annotations

import json

import pytest

from extract_helpers import tiny_model, write_video

from engine.checkpoint import save_checkpoint
from engine.extract.__main__ import main as extract_main
from engine.features import FeatureSpec, read_array
from engine.predict import Predictor
from engine.predict import main as predict_main

SF, CL, TXT = 288, 16, 24  # tiny SlowFast / tiny CLIP dims


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    both = FeatureSpec(video_dims=[SF, CL], text_dim=TXT)
    save_checkpoint(tiny_model(SF + CL + 2, TXT), d / "both.pt", feature_contract=both.to_dict())
    clip_only = FeatureSpec(video_dirs=["clip_features"], video_dims=[CL], text_dim=TXT)
    save_checkpoint(tiny_model(CL + 2, TXT), d / "clip.pt", feature_contract=clip_only.to_dict())
    tvsum = FeatureSpec(video_dirs=["video_features"], video_parts={"video_features": ["{vid}_rgb", "{vid}_opt"]},
                        text_dir="query_features", text_pattern="{qid}", text_key="token", video_dims=[CL], text_dim=TXT)
    save_checkpoint(tiny_model(CL + 2, TXT), d / "tvsum.pt", feature_contract=tvsum.to_dict())
    return d


def test_video_cli_equals_extract_then_predict(ckpts, tmp_path, tiny_clip_dir, capsys):
    video = write_video(tmp_path / "clip.mp4", 100, 10, 48, 32, audio=True)  # 10 s -> 5 clips
    queries = ["a man runs", "dogs bark"]
    qfile = tmp_path / "queries.txt"  # plain lines or jsonl with "query"
    qfile.write_text('\n{"query": "dogs bark"}\n')
    rc = predict_main(["--ckpt", str(ckpts / "both.pt"), "--video", str(video), "--query", queries[0], "--queries",
                       str(qfile), "--clip", str(tiny_clip_dir), "--slowfast-test-config", "tiny", "--device", "cpu",
                       "--kernels", "torch", "--cache-dir", str(tmp_path / "cache"), "--plot", str(tmp_path / "plots")])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n_clips"] == 5 and [r["query"] for r in got["results"]] == queries
    assert all(len(r["saliency"]) == 5 and len(r["windows"]) == 10 for r in got["results"])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["query0.png", "query1.png"]
    # the same through the corpus extractor and the feature API
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"qid": i, "query": s}) + "\n" for i, s in enumerate(queries)))
    out = tmp_path / "feats"
    assert extract_main(["--videos", str(video), "--out", str(out), "--clip", str(tiny_clip_dir), "--queries", str(q),
                         "--slowfast-test-config", "tiny", "--device", "cpu", "--no-progress"]) == 0
    predictor = Predictor.from_checkpoint(ckpts / "both.pt", device="cpu", kernels_backend="torch")
    feats = {d: read_array(out / d / "clip.npz", "features") for d in ("slowfast_features", "clip_features")}
    tokens = [read_array(out / "clip_text_features" / f"qid{i}.npz", "last_hidden_state") for i in range(2)]
    assert predictor.predict(feats, tokens, queries=queries) == got["results"]
    # the Python API reuses the cache (no decoding) and gives the same
    import engine.extract.pipeline as pipeline

    def no_decode(*a, **k):
        raise AssertionError("extracted again despite the cache")

    orig, pipeline.extract_video = pipeline.extract_video, no_decode
    try:
        api = predictor.predict_video(video, queries, clip=tiny_clip_dir, slowfast_test_config="tiny",
                                      cache_dir=tmp_path / "cache", progress=False)
    finally:
        pipeline.extract_video = orig
    assert api["results"] == got["results"]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_clip_only_long_video_windows(ckpts, tmp_path, tiny_clip_dir):
    # 15 minutes at 1 fps, 32x24: 450 CLIP clips, no SlowFast weights needed; windows of max_v_l = 75
    video = write_video(tmp_path / "long.mkv", 900, 1, 32, 24)
    predictor = Predictor.from_checkpoint(ckpts / "clip.pt", device="cpu", kernels_backend="torch")
    res = predictor.predict_video(video, ["a man runs"], clip=tiny_clip_dir, cache_dir=tmp_path / "c", progress=False)
    assert res["n_clips"] == 450
    r = res["results"][0]
    assert len(r["saliency"]) == 450 and len(r["windows"]) == 10
    assert all(0 <= st <= ed <= 900 for st, ed, _ in r["windows"])
    feats = read_array(next((tmp_path / "c").iterdir()) / "clip_features.npz", "features")
    assert feats.shape == (450, CL)
    tokens = predictor._extractors[1].clip.text(["a man runs"])[0].numpy()
    first = predictor._predict_once({"clip_features": feats[:75]}, [tokens])[0]
    assert r["saliency"][:37] == first["saliency"][:37]  # clips only the first window covers (stride 37)


def test_contract_mismatch_and_bad_video(ckpts, tmp_path, tiny_clip_dir, capsys):
    video = write_video(tmp_path / "v.mp4", 20, 10, 32, 24)
    rc = predict_main(["--ckpt", str(ckpts / "tvsum.pt"), "--video", str(video), "--query", "x", "--clip",
                       str(tiny_clip_dir), "--device", "cpu", "--kernels", "torch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "video_features" in err[0] and "slowfast_features" in err[0]
    rc = predict_main(["--ckpt", str(ckpts / "both.pt"), "--video", str(video), "--query", "x", "--clip",
                       str(tiny_clip_dir), "--device", "cpu", "--kernels", "torch"])
    assert rc == 2 and "--slowfast" in capsys.readouterr().err
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    rc = predict_main(["--ckpt", str(ckpts / "clip.pt"), "--video", str(bad), "--query", "x", "--clip",
                       str(tiny_clip_dir), "--device", "cpu", "--kernels", "torch", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: video {bad}: unreadable")
    rc = predict_main(["--ckpt", str(ckpts / "clip.pt"), "--video", str(video), "--clip", str(tiny_clip_dir),
                       "--device", "cpu", "--kernels", "torch"])
    assert rc == 2 and "no queries" in capsys.readouterr().err
