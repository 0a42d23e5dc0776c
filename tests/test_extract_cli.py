"""python -m engine.extract: layout, dims, manifest, engine.features reads it, resumable reruns, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from extract_helpers import write_video, write_zero_length

from engine.extract.__main__ import main
from engine.features import FeatureSpec, read_text_features, read_video_features


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "vidA.mp4", 75, 25, 64, 48, audio=True)  # 3 s
    write_video(d / "vidB.mkv", 50, 10, 40, 56)  # 5 s, portrait
    q = d / "queries.jsonl"
    q.write_text('{"qid": 7, "query": "a man runs"}\n{"qid": 9, "query": "dogs bark", "vid": "vidB"}\n')
    return d, q


def _args(corpus, out, clip_dir, quiet="--quiet"):
    d, q = corpus
    return ["--videos", str(d), "--out", str(out), "--clip", str(clip_dir), "--slowfast-test-config", "tiny",
            "--queries", str(q), "--device", "cpu", quiet, "--batch-size", "2"]


def test_extract_layout_and_resume(corpus, tmp_path, tiny_clip_dir, capsys):
    out = tmp_path / "feats"
    assert main(_args(corpus, out, tiny_clip_dir)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert json.loads(err[-1])["extracted"] == 2 and not any("wrote" in line for line in err), "--quiet: no notes"
    sf_a = np.load(out / "slowfast_features" / "vidA.npz")["features"]
    clip_b = np.load(out / "clip_features" / "vidB.npz")["features"]
    assert sf_a.shape == (2, 288) and sf_a.dtype == np.float32  # ceil(90 / 60) clips; tiny SlowFast 256 + 32
    assert np.load(out / "clip_features" / "vidA.npz")["features"].shape == (2, 16)  # round(3 / 2)
    assert clip_b.shape == (3, 16) and np.load(out / "slowfast_features" / "vidB.npz")["features"].shape == (3, 288)
    assert np.load(out / "clip_text_features" / "qid7.npz")["last_hidden_state"].shape == (10, 24)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["video_dirs"] == ["slowfast_features", "clip_features"]
    assert manifest["video_dims"] == {"slowfast_features": 288, "clip_features": 16} and manifest["text_dim"] == 24
    assert manifest["extractors"]["clip_features"]["fps"] == 0.5 and manifest["videos"] == ["vidA", "vidB"]
    spec = FeatureSpec(video_dims=[288, 16], text_dim=24)  # the standard layout, read as training reads it
    v = read_video_features(out, "vidB", spec)
    assert v.shape == (3, 288 + 16 + 2)
    assert read_text_features(out, 9, spec).shape == (10, 24)  # SOT + "dogsbark" + EOT
    # rerun: nothing is recomputed (files untouched); a deleted file is redone identically
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    (out / "clip_features" / "vidB.npz").unlink()
    assert main(_args(corpus, out, tiny_clip_dir, quiet="--no-progress")) == 0  # the old spelling of --quiet
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["skipped"] == 1 and summary["extracted"] == 1
    for p, t in mtimes.items():
        if p.name != "vidB.npz" or p.parent.name != "clip_features":
            assert p.stat().st_mtime_ns == t, p
    np.testing.assert_array_equal(np.load(out / "clip_features" / "vidB.npz")["features"], clip_b)


def test_extract_bad_input_exit_2(tmp_path, tiny_clip_dir, capsys):
    bad = write_zero_length(tmp_path / "empty.avi")
    rc = main(["--videos", str(bad), "--out", str(tmp_path / "o"), "--clip", str(tiny_clip_dir), "--features", "clip",
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: video ") and "zero-length" in err[-1]
    (tmp_path / "afile").write_text("")
    rc = main(["--videos", str(bad), "--out", str(tmp_path / "afile"), "--clip", str(tiny_clip_dir)])
    err = capsys.readouterr().err.strip().splitlines()  # checked before the models are loaded (no --slowfast here)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --out {tmp_path / 'afile'}") and "is a file" in err[0]
    for flag, value in (("--batch-size", "0"), ("--clip-length", "-2")):
        with pytest.raises(SystemExit) as e:
            main(["--videos", str(bad), "--out", str(tmp_path / "o"), flag, value])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"argument {flag}:" in err[0] and "see" in err[0]
    rc = main(["--videos", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--clip", str(tiny_clip_dir)])
    assert rc == 2 and "no such video" in capsys.readouterr().err
    rc = main(["--videos", str(bad), "--out", str(tmp_path / "o"), "--clip", str(tiny_clip_dir), "--device", "cpu"])
    assert rc == 2 and "--slowfast" in capsys.readouterr().err


def test_extract_video_is_the_documented_recipe(tmp_path, tiny_clip_dir):
    import torch

    from engine.extract.decode import read_frames
    from engine.extract.pipeline import Extractors, extract_video

    video = write_video(tmp_path / "v.mp4", 130, 25, 48, 40)  # 5.2 s at 25 fps
    ex = Extractors.build(["slowfast", "clip"], clip=tiny_clip_dir, slowfast_test_config="tiny", device="cpu",
                          batch_size=2)
    got = extract_video(video, ex, progress=False)
    sf_frames = read_frames(video, 30, size=ex.slowfast.scaled_size)  # (156, 32, 38, 3)
    want_sf = ex.slowfast(torch.from_numpy(sf_frames), source_fps=25)  # HERO: floor(25) / 30 window
    assert want_sf.shape == (3, 288)
    np.testing.assert_allclose(got["slowfast_features"], want_sf.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(want_sf.numpy(), ex.slowfast(torch.from_numpy(sf_frames)).numpy(), atol=1e-4)
    want_clip = ex.clip.image(read_frames(video, 0.5, size=ex.clip.scaled_size))
    assert want_clip.shape == (3, 16)  # round(5.2 / 2)
    np.testing.assert_allclose(got["clip_features"], want_clip.numpy(), rtol=1e-5, atol=1e-6)
