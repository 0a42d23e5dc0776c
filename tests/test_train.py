"""engine.train / engine.predict / engine.checkpoint end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import CheckpointError, load_checkpoint, save_checkpoint
from engine.train import build_parser, main, train
from reference import LDDETR, LDDETRConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "queue_length=16", "--batch-size", "4", "--num-workers", "0", "--quiet"]


def _args(root: Path, out: Path, *extra: str):
    return build_parser().parse_args(["--data-root", str(root), "--dataset", "synthetic", "--out", str(out),
                                      "--epochs", "2", *TINY, *extra])


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    summary = train(_args(tiny_synthetic, out))
    assert summary["best_epoch"] in (1, 2)
    return out


def test_training_writes_every_artifact(trained):
    for name in ("best.pt", "latest.pt", "best_val_preds.jsonl", "metrics.json", "train.log", "config.json"):
        assert (trained / name).is_file(), name
    assert any((trained / "tb").iterdir())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert "MR-full-R1@0.5" in metrics["best"] and len(metrics["history"]) == 2
    preds = [json.loads(line) for line in (trained / "best_val_preds.jsonl").read_text().splitlines()]
    assert len(preds) == 8
    assert all(len(p["pred_relevant_windows"]) == 10 and len(p["pred_relevant_windows"][0]) == 3 for p in preds)
    assert not [p for p in trained.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_is_plain_data_and_reloads(trained, tiny_synthetic):
    raw = torch.load(trained / "best.pt", weights_only=True)  # no pickled code
    assert raw["format"] == "ld-detr-checkpoint"
    assert raw["feature_contract"]["video_dirs"] == ["slowfast_features", "clip_features"]
    assert {"torch", "python", "ld_detr"} <= set(raw["versions"])
    model, meta = load_checkpoint(trained / "best.pt")
    assert isinstance(model, LDDETR) and not model.training is None
    assert meta["epoch"] == raw["epoch"] and "resume" not in meta
    latest = torch.load(trained / "latest.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng", "state"} <= set(latest["resume"])


def test_resume_continues_bit_identically(tiny_synthetic, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(_args(tiny_synthetic, full))
    train(_args(tiny_synthetic, part), stop_after_epoch=1)
    assert json.loads((part / "metrics.json").read_text())["history"][-1]["epoch"] == 1
    train(_args(tiny_synthetic, part, "--resume", str(part / "latest.pt")))
    a = torch.load(full / "latest.pt", weights_only=True)
    b = torch.load(part / "latest.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["resume"]["state"]["history"][1]["loss"] == b["resume"]["state"]["history"][1]["loss"]


def test_resume_refuses_mismatches(trained, tiny_synthetic, tmp_path, capsys):
    assert main(["--data-root", str(tiny_synthetic), "--dataset", "synthetic", "--out", str(tmp_path), *TINY,
                 "--epochs", "2", "--resume", str(trained / "best.pt")]) == 2
    assert "has no resume state" in capsys.readouterr().err
    assert main(["--data-root", str(tiny_synthetic), "--dataset", "synthetic", "--out", str(tmp_path), *TINY,
                 "--epochs", "3", "--resume", str(trained / "latest.pt")]) == 2
    assert "config differs" in capsys.readouterr().err


def test_bad_checkpoints_are_refused(tmp_path, trained):
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes((trained / "best.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not an LD-DETR checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=10, t_feat_dim=6, queue_length=8)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(LDDETR(cfg), path, epoch=1)
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(LDDETR(cfg), path, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_train_cli_reports_bad_input(tmp_path, capsys):
    assert main(["--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    assert main(["--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    assert "no train annotation file" in capsys.readouterr().err
    assert main(["--set", "decoder_loop=2", "--data-root", str(tmp_path / "d"), "--train-file", "x", "--val-file", "y",
                 "--out", str(tmp_path / "o")]) == 2


def test_predict_cli_and_api(trained, tiny_synthetic, tmp_path):
    out = tmp_path / "preds.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "engine.predict", "--ckpt", str(trained / "best.pt"),
                        "--data-root", str(tiny_synthetic), "--split", "val", "--out", str(out),
                        "--plot", str(tmp_path / "plots")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "MR-full-R1@0.5" in r.stdout  # ground truth known: metrics printed
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 8 and len(list((tmp_path / "plots").glob("*.png"))) == 8

    import numpy as np

    from engine.predict import Predictor

    predictor = Predictor.from_checkpoint(trained / "best.pt", device="cpu")
    rec = preds[0]
    vid, qid = rec["vid"], rec["qid"]
    video = {d: np.load(tiny_synthetic / d / f"{vid}.npz")["features"] for d in ("slowfast_features", "clip_features")}
    text = np.load(tiny_synthetic / "clip_text_features" / f"qid{qid}.npz")["last_hidden_state"]
    other = np.load(tiny_synthetic / "clip_text_features" / f"qid{preds[1]['qid']}.npz")["last_hidden_state"]
    results = predictor.predict(video, [text, other], queries=["q", "other"])
    # same numbers as the batched (padded) CLI run, up to the last rounded digit
    np.testing.assert_allclose(results[0]["windows"], rec["pred_relevant_windows"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(results[0]["saliency"], rec["pred_saliency_scores"], atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="video feature"):
        predictor.predict({"slowfast_features": video["slowfast_features"][:, :5],
                           "clip_features": video["clip_features"]}, [text])


def test_predict_refuses_mismatched_features(trained, tmp_path):
    from engine.synthetic import make_synthetic_dataset

    other = tmp_path / "other"
    make_synthetic_dataset(other, n_train=4, n_val=4, min_clips=8, max_clips=10, clip_dim=16)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "engine.predict", "--ckpt", str(trained / "best.pt"),
                        "--data-root", str(other), "--out", str(tmp_path / "p.jsonl")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_amp_bf16_training_runs(tiny_synthetic, tmp_path):
    out = tmp_path / "amp"
    summary = train(build_parser().parse_args([
        "--data-root", str(tiny_synthetic), "--dataset", "synthetic", "--out", str(out), "--epochs", "1",
        "--amp", "bf16", "--max-steps-per-epoch", "2", *TINY]))
    assert summary["best"] is not None and (out / "best.pt").is_file()


@pytest.mark.parametrize("backend", [
    "eager",  # dynamo capture of the whole training forward (graph breaks included), seconds
    pytest.param("inductor", marks=pytest.mark.slow),  # + inductor codegen: ~8 min on 2 CPU cores
])
def test_compile_training_runs_and_logs_compile_time(tiny_synthetic, tmp_path, backend):
    """--compile on CPU: the conv blocks compiled (engine.train_compile; the whole-forward CUDA policy is
    tested in tests/test_kernels_gru_sequence.py), captured without a graph break; the first (compiling)
    step is logged apart from the steady-state throughput."""
    from torch._dynamo.utils import counters

    counters.clear()
    out = tmp_path / "compiled"
    summary = train(build_parser().parse_args([
        "--data-root", str(tiny_synthetic), "--dataset", "synthetic", "--out", str(out), "--epochs", "1",
        "--compile", "--compile-backend", backend, "--max-steps-per-epoch", "2", *TINY]))
    assert summary["best"] is not None
    assert not counters["graph_break"], dict(counters["graph_break"])
    log_text = (out / "train.log").read_text()
    assert "includes torch.compile" in log_text and "it/s" in log_text


def test_tvsum_layout_trains_and_selects_on_highlight_map(tmp_path):
    """TVSum features (video_features/{vid}_rgb.npy + _opt.npy, query_features/{qid}.npz 'token'), no moment
    labels: training runs and keeps the best epoch by HL-Top5-mAP."""
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "tvsum"
    (root / "video_features").mkdir(parents=True)
    (root / "query_features").mkdir()
    domains = ["BK", "BT"]
    for split, n in (("train", 4), ("val", 2)):
        rows = []
        for i in range(n):
            vid = f"{split}{i}"
            t = 10 + i
            np.save(root / "video_features" / f"{vid}_rgb.npy", rng.normal(size=(t, 8)).astype(np.float32))
            np.save(root / "video_features" / f"{vid}_opt.npy", rng.normal(size=(t, 8)).astype(np.float32))
            np.savez(root / "query_features" / f"{vid}.npz", token=rng.normal(size=(5, 12)).astype(np.float32))
            label = rng.integers(1, 6, size=(t, 20)).astype(float).tolist()
            rows.append({"qid": vid, "query": f"video {vid}", "duration": t, "vid": vid, "relevant_clip_ids": None,
                         "relevant_windows": None, "label": label, "domain": domains[i % 2]})
        (root / f"tvsum_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    summary = train(build_parser().parse_args([
        "--dataset", "tvsum", "--data-root", str(root), "--train-file", str(root / "tvsum_train.jsonl"),
        "--val-file", str(root / "tvsum_val.jsonl"), "--out", str(out), "--epochs", "1", "--set", "queue_length=16",
        "--batch-size", "2", "--quiet"]))
    assert "HL-Top5-mAP" in summary["best"]
    model, meta = load_checkpoint(out / "best.pt")
    assert model.cfg.v_feat_dim == 8 + 8 + 2 and model.cfg.t_feat_dim == 12
