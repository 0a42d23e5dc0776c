"""``python -m export``: ONNX export + onnxruntime parity at three video lengths (one unseen) and two batch
sizes, the metadata, the CLI's errors; the AOTInductor path's torch.export step (the compile is -m slow);
TensorRT fails cleanly where it is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import randomize_bn_stats_
from engine import save_checkpoint
from export.__main__ import main
from reference import LDDETR, LDDETRConfig

REPO = Path(__file__).resolve().parents[1]
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small-depth model with random weights and non-trivial BN statistics, saved as engine.train does."""
    torch.manual_seed(0)
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=24, t_feat_dim=16, queue_length=16,
                              num_v2t_encoder_layers=1, num_encoder1_layers=1, num_encoder2_layers=1,
                              num_convolutional_blocks=2, dim_feedforward=256)
    model = randomize_bn_stats_(LDDETR(cfg).eval())
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(model, path, feature_contract={"video_dirs": ["a"], "v_feat_dim": 24}, epoch=3)
    return path


def test_onnx_export_verifies_and_carries_metadata(ckpt, tmp_path):
    """The CLI as users run it, in a fresh process (an earlier torch.compile in the same process can make the
    dynamo exporter fall back to a static video length; the CLI never shares a process with one)."""
    out = tmp_path / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "export", "onnx", str(ckpt), "--out", str(out), "--verify"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "verification passed" in text and text.count(" yes") == 18  # 3 lengths x 2 batches x 3 outputs
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["ld_detr.config"])["num_convolutional_blocks"] == 2
    assert json.loads(meta["ld_detr.feature_contract"])["v_feat_dim"] == 24
    assert [i.name for i in model.graph.input] == ["video", "video_mask", "text", "text_mask"]
    assert [o.name for o in model.graph.output] == ["pred_logits", "pred_spans", "saliency_scores"]
    assert not list(tmp_path.glob("tmp*"))  # the temporary folder is gone


def test_verify_catches_a_wrong_artifact(ckpt):
    """A test that cannot fail is a defect: a runner that perturbs one output fails verification."""
    from export.model import prepare
    from export.verify import verify

    prepared = prepare(ckpt)

    def wrong(*x):
        with torch.no_grad():
            outs = [o.numpy() for o in prepared.module(*x)]
        outs[2] = outs[2] * 1.01
        return outs

    result = verify(prepared, wrong, dynamic=True, batch=1, max_video_len=40, text_len=8)
    assert not result["ok"]
    assert {r["output"] for r in result["rows"] if not r["ok"]} == {"saliency_scores"}


def test_verify_half_accepts_near_tie_flips_only(ckpt):
    """fp16 verify: a top-1 flip between two moments PyTorch scores within tol is left out of the saliency
    comparison (even when every sample flipped); a decisive flip fails, though every output is within tol."""
    import numpy as np

    from export.model import Prepared, prepare
    from export.verify import verify

    cfg = prepare(ckpt).cfg
    fg = torch.tensor([0.2, 0.18, -2.0] + [-3.0] * (cfg.num_queries - 3))  # moments 0 and 1 near, 2 far behind

    def module(video, vmask, text, tmask):  # logits offset by 300: a few units of change stay within 1e-2
        b, t = vmask.shape
        q = fg.shape[0]
        logits = torch.stack([300 + fg, torch.full((q,), 300.0)], -1).expand(b, q, 2)
        return logits, torch.full((b, q, 2), 0.5), video[..., 0] + 1

    fake = Prepared(module, cfg, {}, "test")

    def runner(flip_to: int):
        def run(*x):
            logits, spans, sal = [o.numpy().copy() for o in module(*x)]
            logits[:, flip_to, 0] = 300 + 0.3  # the runner's best is now moment flip_to
            return logits, spans, sal * 1.5  # wrong saliency: seen only if a flipped sample were compared
        return run

    kw = dict(dynamic=True, batch=1, max_video_len=40, text_len=8, tol=1e-2, half=True)
    p = torch.sigmoid(fg)
    assert p[0] - p[1] < 1e-2 < p[0] - p[2]
    near = verify(fake, runner(1), **kw)
    assert near["ok"], near["rows"]
    assert all(r["top1_flips"] for r in near["rows"] if r["output"] == "saliency_scores")
    far = verify(fake, runner(2), **kw)
    assert not far["ok"]
    assert {r["output"] for r in far["rows"] if not r["ok"]} == {"saliency_scores"}


def test_aoti_export_program_runs(ckpt):
    """The torch.export half of the AOTInductor path, with dynamic shapes, matches the module."""
    from export.backends import export_program
    from export.model import example_inputs, prepare

    prepared = prepare(ckpt)
    program = export_program(prepared, dynamic=True, batch=1, max_video_len=40, text_len=8)
    x = example_inputs(prepared.cfg, 3, 40, 5, seed=3)  # another batch and text length; 40 clips (static)
    x[1][1:, 29:] = False  # shorter videos through the mask
    with torch.no_grad():
        ref, got = prepared.module(*x), program.module()(*x)
    valid = x[1]  # saliency past a sample's length is not meaningful (eager packs the clips, see engine.fused.packing)
    for name, r, g in zip(("logits", "spans", "saliency"), ref, got):
        if name == "saliency":
            r, g = r[valid], g[valid]
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_aoti_package_verifies(ckpt, tmp_path):
    """AOTInductor compile + aoti_load_package + parity (minutes of C++ compilation on 2 CPU cores)."""
    out = tmp_path / "model.pt2"
    assert main(["aoti", str(ckpt), "--out", str(out), "--verify", "--max-video-len", "40"]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_trt_without_tensorrt_fails_cleanly(ckpt, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("tensorrt and CUDA are present: the real path runs where they are")
    assert main(["trt", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("tensorrt" in err[0].lower() or "CUDA" in err[0])


def test_cli_errors(ckpt, tmp_path, capsys):
    assert main(["onxx", str(ckpt)]) == 2
    assert "did you mean 'onnx'" in capsys.readouterr().err
    assert main(["onnx", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["onnx", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["onnx", str(ckpt), "--max-video-len", "500"]) == 2
    assert "exceeds the model's max video length" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["aoti", str(ckpt), "--device", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory):
    """A small model with the feature contract of a tiny synthetic dataset (QVHighlights on-disk format)."""
    from engine.features import feature_spec_for
    from engine.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, n_train=2, n_val=12, min_clips=10, max_clips=20)
    spec = feature_spec_for("synthetic", root)
    torch.manual_seed(1)
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=spec.v_feat_dim, t_feat_dim=spec.t_feat_dim,
                              queue_length=16, num_v2t_encoder_layers=1, num_encoder1_layers=1,
                              num_encoder2_layers=1, num_convolutional_blocks=2, dim_feedforward=256)
    model = randomize_bn_stats_(LDDETR(cfg).eval())
    path = root / "best.pt"
    save_checkpoint(model, path, feature_contract=spec.to_dict(), epoch=1, dataset="synthetic")
    return path, root


def test_half_onnx_and_metric_deltas_on_a_split(synthetic_ckpt, tmp_path):
    """--half: fp16 graph inputs, finite masks (no NaN from 0 * -inf), within 1e-2 of fp32 PyTorch; --data-root:
    the same split through PyTorch and the artifact, with the metric deltas printed and checked (loosely: one
    query of 12 is 8.3 points, and fp16 can flip a random model's top-1 moment, whose two best scores are
    often 1e-4 apart; the fp32 exactness of the deltas is the next test)."""
    ckpt, root = synthetic_ckpt
    out = tmp_path / "half.onnx"
    proc = subprocess.run([sys.executable, "-m", "export", "onnx", str(ckpt), "--out", str(out), "--half", "--verify",
                           "--data-root", str(root), "--max-video-len", "20", "--metric-tol", "20"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {p.key: p.value for p in model.metadata_props}["ld_detr.precision"] == "fp16"
    assert "verification passed" in proc.stdout and "metric check passed" in proc.stdout
    assert "MR-full-R1@0.5" in proc.stdout and "12 queries" in proc.stdout


def test_metric_deltas_catch_a_wrong_artifact(synthetic_ckpt):
    from export.metrics import metric_deltas
    from export.model import prepare

    ckpt, root = synthetic_ckpt
    prepared = prepare(ckpt)

    def exact(*x):
        with torch.no_grad():
            return [o.numpy() for o in prepared.module(*x)]

    def shifted(*x):  # every predicted span moved: the moment-retrieval metrics must drop
        logits, spans, sal = exact(*x)
        return logits, (spans + 0.3) % 1.0, sal

    same = metric_deltas(prepared, exact, root)
    assert same["queries"] == 12 and all(v == 0 for v in same["delta"].values())
    moved = metric_deltas(prepared, shifted, root)
    assert any(abs(v) > 1.0 for k, v in moved["delta"].items() if k.startswith("MR-"))
    assert main(["onnx", str(ckpt), "--data-root", str(root)]) == 2  # --data-root without --verify


GRU_CHECK = r"""
import sys, torch, onnxruntime as ort
from reference.heads import HighlightDetectionHead
torch.manual_seed(3)
gru = HighlightDetectionHead(64).gru.eval()
with torch.no_grad():
    for p in gru.parameters():
        p.uniform_(-0.5, 0.5)
class Seq(torch.nn.Module):  # the head reads every step's state: export the full output sequence
    def __init__(self):
        super().__init__()
        self.gru = gru
    def forward(self, x):
        return self.gru(x)[0]
t = torch.export.Dim("t", min=1, max=128)
with torch.no_grad():
    program = torch.onnx.export(Seq(), (torch.randn(2, 9, 64),), dynamo=True, dynamic_shapes=({1: t},),
                                input_names=["x"])
program.save(sys.argv[1])
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for length in (1, 2, 7, 40, 75):
    x = torch.randn(2, length, 64)
    with torch.no_grad():
        ref = gru(x)[0].numpy()
    print(length, float(abs(session.run(None, {"x": x.numpy()})[0] - ref).max()))
"""


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="torch 2.11's dynamo exporter specialises nn.GRU's sequence length (a static graph); the "
                           "fused model's GRU op exports as its own GRU node on every version (test_fused_onnx)")
def test_gru_exports_exactly_at_several_lengths(tmp_path):
    """The hazard the dynamo exporter has shipped: ONNX GRU's linear_before_reset (torch applies the reset
    gate after the hidden projection). The highlight head's GRU alone, dynamic sequence length, onnxruntime
    against torch at lengths 1, 2, 7, 40 and 75 with random (never zero) weights and inputs. In its own
    process: an earlier torch.compile in this one can make the exporter specialise the length."""
    proc = subprocess.run([sys.executable, "-c", GRU_CHECK, str(tmp_path / "gru.onnx")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = {int(a): float(b) for a, b in (line.split() for line in proc.stdout.strip().splitlines()[-5:])}
    assert set(errors) == {1, 2, 7, 40, 75}
    assert max(errors.values()) < 1e-5, errors
