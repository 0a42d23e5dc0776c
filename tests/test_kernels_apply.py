"""``kernels.apply`` on a whole reference LDDETR: same state_dict, same outputs and gradients as the torch
path (Triton interpreter on CPU, the real compiler on a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from reference import LDDETR  # noqa: E402

from conftest import random_batch, randomize_bn_stats_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("strict_fp32")  # conftest: the torch reference in true fp32 on GPUs


def _model(small_cfg):
    return randomize_bn_stats_(LDDETR(small_cfg).to(DEVICE))


def _batch(cfg):
    # 4 samples: the queue length (64) is a multiple of the batch, so the training forward enqueues in place
    # right after the loss (the official rule skips partial batches) and backward must not need the old queue
    video, vmask, text, tmask = random_batch(cfg, [19, 14, 17, 12], [7, 5, 9, 3])
    return [t.to(DEVICE) for t in (video, vmask, text, tmask)]


def test_apply_eval_outputs_match(fresh_seed, small_cfg):
    ref = _model(small_cfg).eval()
    fast = kernels.apply(copy.deepcopy(ref), "triton", precision="ieee")
    assert fast.state_dict().keys() == ref.state_dict().keys()
    batch = _batch(small_cfg)
    with torch.no_grad():
        a, b = ref(*batch), fast(*batch)
    for key in ("pred_logits", "pred_spans", "saliency_scores"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_apply_train_step_outputs_and_grads_match(fresh_seed, small_cfg):
    ref = _model(small_cfg).train()
    fast = kernels.apply(copy.deepcopy(ref), "triton", precision="ieee")
    batch = _batch(small_cfg)
    outs = []
    for model in (ref, fast):
        torch.manual_seed(fresh_seed)  # the same dropout masks
        out = model(*batch, alpha=0.4)
        loss = out["loss_align"] + out["loss_sim"] + out["pred_spans"].sum() + out["saliency_scores"].sum()
        loss.backward()
        outs.append(out)
    for key in ("loss_align", "loss_sim", "pred_spans", "saliency_scores"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-5, atol=1e-6, msg=key)
    for (name, pa), pb in zip(ref.named_parameters(), fast.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the queues advanced identically
    torch.testing.assert_close(fast.distill_align.vid_queue, ref.distill_align.vid_queue)
    assert int(fast.distill_align.queue_ptr) == int(ref.distill_align.queue_ptr) == 4


def test_apply_torch_backend_is_the_reference(small_cfg):
    model = kernels.apply(_model(small_cfg).eval(), "torch")
    assert type(model.distill_align).__name__ == "TritonDistillAlign"
    ref = _model(small_cfg).eval()
    ref.load_state_dict(model.state_dict())
    batch = _batch(small_cfg)
    with torch.no_grad():
        a, b = ref(*batch), model(*batch)
    assert torch.equal(a["pred_spans"], b["pred_spans"])


def test_auto_precision_picks_the_queue_kernel_only_where_it_is_faster(monkeypatch, small_cfg):
    """precision "auto": fp32 features at torch's "highest" matmul precision keep the torch path (the exact
    kernel is slower than cuBLAS fp32); "high" (TF32 allowed) runs the kernel; explicit "ieee" forces it."""
    import kernels.queue_loss as ql

    calls = []
    real = ql.distill_align_loss
    monkeypatch.setattr(ql, "distill_align_loss", lambda *a, **k: calls.append(k["precision"]) or real(*a, **k))
    model = kernels.apply(_model(small_cfg).train(), "triton")
    batch = _batch(small_cfg)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        model(*batch, alpha=0.4)
        assert calls == []
        torch.set_float32_matmul_precision("high")
        model(*batch, alpha=0.4)
        assert calls == ["auto"]
    finally:
        torch.set_float32_matmul_precision(saved)
    kernels.apply(model, "triton", precision="ieee")
    model(*batch, alpha=0.4)
    assert calls == ["auto", "ieee"]
