"""The training step's host syncs (op-count gate) and the deferred non-finite check."""

from __future__ import annotations

import pytest
import torch

from conftest import OpCounter
from engine.data import MomentDataset, load_annotations, make_loader
from engine.features import feature_spec_for
from engine.train import TrainError, build_parser, make_optimizer, train, train_step
from reference import LDDETR, LDDETRConfig
from reference.losses import build_criterion


def test_training_step_has_no_host_sync(tiny_synthetic):
    """forward + criterion + backward + clip + AdamW step: zero aten._local_scalar_dense (a GPU->host sync
    on CUDA). The matcher's .cpu() transfer is a copy, not counted here. Counted on CPU tensors: the same
    ops run on CUDA."""
    spec = feature_spec_for("synthetic", tiny_synthetic)
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=spec.v_feat_dim, t_feat_dim=spec.t_feat_dim,
                              queue_length=16)
    model = LDDETR(cfg).train()
    criterion = build_criterion(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr, cfg.wd, torch.device("cpu"))
    ann = load_annotations(sorted(tiny_synthetic.glob("*train*.jsonl"))[0])
    batch = next(iter(make_loader(MomentDataset(ann, tiny_synthetic, spec, dataset="synthetic"), 4)))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):  # the second step has optimizer state
        with OpCounter() as ops:  # engine.train's own step: momentum update, forward, enqueue, criterion, ...
            losses = train_step(model, criterion, optimizer, scaler, params, batch, alpha=0.4, amp="off",
                                device=torch.device("cpu"), grad_clip=cfg.grad_clip)
        assert ops.counts["aten._local_scalar_dense"] == 0, ops.counts["aten._local_scalar_dense"]
        assert ops.counts["aten._fused_adamw_"] == 1  # the fused optimizer ran (one kernel, all params)
    assert torch.isfinite(losses["loss"])


def test_non_finite_loss_stops_training(tiny_synthetic, tmp_path, monkeypatch):
    import engine.train as train_mod

    real = train_mod.build_criterion

    def nan_criterion(cfg):
        crit = real(cfg)

        def run(outputs, targets):
            losses = crit(outputs, targets)
            losses["loss"] = losses["loss"] * float("nan")
            return losses

        return run

    monkeypatch.setattr(train_mod, "build_criterion", nan_criterion)
    args = build_parser().parse_args(["--data-root", str(tiny_synthetic), "--dataset", "synthetic", "--out",
                                      str(tmp_path / "run"), "--epochs", "1", "--set", "queue_length=16",
                                      "--batch-size", "4", "--num-workers", "0", "--quiet"])
    with pytest.raises(TrainError, match="non-finite loss at epoch 1"):
        train(args)
