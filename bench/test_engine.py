"""pytest-benchmark: the inference engine against the reference model in eager mode (``pytest bench/``).

Each test alternates reference and engine over >= 15 pairs in one process (``bench.timing.alternate``) and
records the medians and the per-pair ratio (engine / reference) in ``extra_info``; the benchmark row itself
times the engine. On CPU the engine must not be slower than the reference (ratio median <= 1.05).
Shapes: the QVHighlights preset, T = 75 clips, N = 20 query tokens. ``LDDETR_BENCH_SMOKE=1`` (what CI
runs, with ``--benchmark-disable``) shrinks the inputs and pairs so the file only checks that it still runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.timing import alternate
from engine.inference import build
from reference import LDDETR, LDDETRConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMOKE = os.environ.get("LDDETR_BENCH_SMOKE", "0") not in ("", "0")


def _inputs(cfg, b, t=75, n=20):
    video = torch.randn(b, t, cfg.v_feat_dim, device=DEVICE)
    text = torch.randn(b, n, cfg.t_feat_dim, device=DEVICE)
    vmask = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    vmask[1:, t - t // 10 - 1:] = False  # some padding
    tmask = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
    return video, vmask, text, tmask


@pytest.mark.parametrize("batch", [1, 32])
def test_inference_engine_vs_reference(benchmark, batch):
    if DEVICE == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if SMOKE:
        cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=32, t_feat_dim=32, queue_length=64)
        batch = min(batch, 2)
    else:
        cfg = LDDETRConfig.preset("qvhighlights", queue_length=1024)
    model = LDDETR(cfg).eval().to(DEVICE)
    eng = build(model, device=DEVICE)
    x = _inputs(cfg, batch, t=12 if SMOKE else 75, n=6 if SMOKE else 20)

    def reference():
        with torch.no_grad():
            return model(*x)

    def engine():
        return eng(*x)

    stats = alternate(reference, engine, pairs=2 if SMOKE else 15)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                                threads=torch.get_num_threads(), batch=batch, **stats)
    benchmark.pedantic(engine, rounds=5, iterations=1, warmup_rounds=1)
    if DEVICE == "cpu" and not SMOKE:
        assert stats["ratio_median"] <= 1.05, stats


def test_training_step_engine_vs_reference(benchmark, tmp_path):
    """A B=32 training step: engine.train's step (fused AdamW, kernels.apply, deferred read-back) against the
    plain eager loop (default AdamW, the loss read back and checked every step), alternating."""
    import copy

    import kernels
    from engine.data import MomentDataset, load_annotations, make_loader
    from engine.features import feature_spec_for
    from engine.synthetic import make_synthetic_dataset
    from engine.train import _to_device, make_optimizer, train_step
    from reference.losses import build_criterion

    if DEVICE == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    batch_size, clips = (2, 12) if SMOKE else (32, 75)
    make_synthetic_dataset(tmp_path, n_train=batch_size, n_val=1, min_clips=clips, max_clips=clips)
    spec = feature_spec_for("synthetic", tmp_path)
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=spec.v_feat_dim, t_feat_dim=spec.t_feat_dim,
                              queue_length=64 if SMOKE else 65536)
    ann = load_annotations(sorted(tmp_path.glob("*train*.jsonl"))[0])
    batch = next(iter(make_loader(MomentDataset(ann, tmp_path, spec, dataset="synthetic"), batch_size)))
    batch = _to_device(batch, torch.device(DEVICE))
    criterion = build_criterion(cfg)

    ref = LDDETR(cfg).train().to(DEVICE)
    eng = kernels.apply(copy.deepcopy(ref), "auto")
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    eng_params = [p for p in eng.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=cfg.lr, weight_decay=cfg.wd)
    eng_opt = make_optimizer(eng_params, cfg.lr, cfg.wd, torch.device(DEVICE))
    scaler = torch.amp.GradScaler(DEVICE, enabled=False)

    def reference_step():
        out = ref(batch["video"], batch["video_mask"], batch["text"], batch["text_mask"], alpha=0.4)
        loss = criterion(out, batch["targets"])["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_params, cfg.grad_clip)
        ref_opt.step()
        return float(loss.detach())

    def engine_step():
        return train_step(eng, criterion, eng_opt, scaler, eng_params, batch, alpha=0.4, amp="off",
                          device=torch.device(DEVICE), grad_clip=cfg.grad_clip)

    stats = alternate(reference_step, engine_step, pairs=2 if SMOKE else 15)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                                threads=torch.get_num_threads(), batch=batch_size, **stats)
    benchmark.pedantic(engine_step, rounds=3, iterations=1, warmup_rounds=0)
