"""engine.step: one graph, no host sync or host<->device copy, and the same losses as the official-form step."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.data import MomentDataset, load_annotations, make_loader
from engine.features import feature_spec_for
from engine.step import TrainStep, batch_to_device, init_adamw_state, lr_to_device_, make_optimizer
from engine.train import _to_device, train_step
from engine.train import make_optimizer as official_optimizer
from reference import LDDETR, LDDETRConfig, warmup_alpha
from reference.losses import build_criterion

SMALL = dict(queue_length=16, num_v2t_encoder_layers=1, num_encoder1_layers=1, num_convolutional_blocks=1,
             num_encoder2_layers=1, dim_feedforward=64, decoder_loops=1)


def _cfg(v_dim: int, t_dim: int, **kw) -> LDDETRConfig:
    return LDDETRConfig.preset("qvhighlights", v_feat_dim=v_dim, t_feat_dim=t_dim, **{**SMALL, **kw})


class TransferCounter(TorchDispatchMode):
    """Counts what would stall or copy on an accelerator: scalar reads (``.item()``, ``bool(t)``), tensors
    made from host data (``torch.tensor(list)``), and any op whose tensors sit on more than one device."""

    def __init__(self):
        super().__init__()
        self.events = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name == "aten._local_scalar_dense":
            self.events["scalar read"] += 1
        if name in ("aten.lift_fresh", "aten.lift_fresh_copy"):
            self.events["host data"] += 1
        devices = self._devices((*args, *kwargs.values()))
        if kwargs.get("device") is not None:
            devices.add(torch.device(kwargs["device"]).type)
        if len(devices) > 1:  # counted before running it: a copy out of the meta device raises
            self.events[f"cross-device {name}"] += 1
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if len(devices | self._devices((out,))) > 1:
            self.events[f"cross-device {name}"] += 1
        return out

    @staticmethod
    def _devices(values) -> set:
        flat = [x for a in values for x in (a if isinstance(a, (list, tuple)) else [a])]
        return {x.device.type for x in flat if isinstance(x, torch.Tensor)}


@pytest.fixture(scope="module")
def _meta_fused_adamw():
    """The meta device stands in for an accelerator (no data, nothing reads back); torch has no meta kernel
    for the tensor-lr fused AdamW, so give it one that only checks nothing (shapes are already equal)."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_fused_adamw_.tensor_lr", lambda *args, **kwargs: None, "Meta")
    yield
    del lib


def _meta_step(solver: str = "device"):
    dev = torch.device("meta")
    cfg = _cfg(20, 12, matcher=solver)
    model = LDDETR(cfg).train().to(dev)
    criterion = build_criterion(cfg).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wd)  # fused refuses meta at construction
    optimizer.param_groups[0]["fused"] = True
    lr_to_device_(optimizer, dev)
    init_adamw_state(optimizer)
    b, t, n = 4, 9, 5
    batch = {"video": torch.randn(b, t, 20, device=dev), "video_mask": torch.ones(b, t, dtype=torch.bool, device=dev),
             "text": torch.randn(b, n, 12, device=dev), "text_mask": torch.ones(b, n, dtype=torch.bool, device=dev),
             "targets": {"span_targets": torch.rand(b, 5, 2, device=dev),
                         "span_mask": torch.ones(b, 5, dtype=torch.bool, device=dev),
                         "span_labels": [torch.rand(2, 2, device=dev) for _ in range(b)],
                         "saliency_pos_labels": torch.zeros(b, 2, dtype=torch.long, device=dev),
                         "saliency_neg_labels": torch.zeros(b, 2, dtype=torch.long, device=dev),
                         "saliency_all_labels": torch.zeros(b, t, device=dev)}}
    step = TrainStep(model, criterion, optimizer, params, grad_clip=cfg.grad_clip, device=dev)
    return step, batch


def test_step_has_no_host_sync_and_no_copy(_meta_fused_adamw):
    """The whole step (forward with momentum update and enqueue, device matcher, criterion, backward, clip,
    fused AdamW) on the meta device: any read-back would raise there, and the counter sees every copy."""
    step, batch = _meta_step()
    for _ in range(2):  # the second step runs on the optimizer state of the first
        step.set_alpha(0.2)
        with TransferCounter() as counter:
            losses = step(batch)
        assert dict(counter.events) == {}
        assert losses["loss"].device.type == "meta" and "loss_span_0" in losses


def test_the_gate_sees_syncs_and_copies(_meta_fused_adamw):
    """The same gate catches the official host matcher and the usual ways a step leaks to the host."""
    step, batch = _meta_step(solver="scipy")
    with TransferCounter() as counter, pytest.raises(NotImplementedError, match="meta"):
        step(batch)  # the scipy matcher's .cpu(): counted, then it fails (a meta tensor has no data)
    assert counter.events["cross-device aten._to_copy"] >= 1
    x = torch.ones(3, device="meta")
    with TransferCounter() as counter:
        _ = x + torch.tensor([1.0, 2.0, 3.0]).to("meta")  # a host-built tensor moved over
    assert counter.events["host data"] == 1 and counter.events["cross-device aten._to_copy"] == 1
    with TransferCounter() as counter, pytest.raises(RuntimeError):
        bool(x.sum() > 0)  # a data-dependent branch: a scalar read
    assert counter.events["scalar read"] == 1


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="dynamo's trace_autograd_ops (torch >= 2.11) is what lets explain() trace backward()")
def test_step_is_one_graph_with_backward_and_fused_adamw(tiny_synthetic):
    """dynamo traces forward, criterion, backward (trace_autograd_ops), clipping and the fused AdamW kernel as
    ONE graph: no graph break anywhere in the step."""
    spec = feature_spec_for("synthetic", tiny_synthetic)
    cfg = _cfg(spec.v_feat_dim, spec.t_feat_dim)
    ds = MomentDataset(load_annotations(tiny_synthetic / "train.jsonl"), tiny_synthetic, spec, dataset="synthetic",
                       max_windows=cfg.max_windows)
    batch = batch_to_device(next(iter(make_loader(ds, 4))), torch.device("cpu"))
    model = LDDETR(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, build_criterion(cfg), make_optimizer(params, cfg.lr, cfg.wd, torch.device("cpu")),
                     params, grad_clip=cfg.grad_clip, device=torch.device("cpu"))
    step.set_alpha(0.3)
    with torch._dynamo.config.patch(trace_autograd_ops=True, allow_rnn=True):
        explained = torch._dynamo.explain(step.__call__)(batch)
    assert explained.graph_break_count == 0, [r.reason[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1
    targets = [str(n.target) for n in explained.graphs[0].graph.nodes]
    assert sum("_fused_adamw_" in t for t in targets) == 1


def _batches(root, cfg, n_steps, full_length: bool):
    spec = feature_spec_for("synthetic", root)
    ds = MomentDataset(load_annotations(root / "train.jsonl"), root, spec, dataset="synthetic",
                       max_windows=cfg.max_windows)
    loader = make_loader(ds, 3, shuffle=True, seed=3)
    out = []
    while len(out) < n_steps:
        for batch in loader:
            if full_length:  # padding cannot matter: every video as long as the batch's longest
                batch["video_mask"][:] = True
            batch["video"], batch["text"] = batch["video"].double(), batch["text"].double()
            out.append(batch)
    return out[:n_steps]


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # dropout on: the RNG draws must match too
def test_fifty_steps_equal_the_official_step(tiny_synthetic, dropout):
    """Same seed, same batches: engine.step (device matcher, padded criterion, tensor alpha/lr, direct fused
    AdamW) against engine.train.train_step (scipy matcher, per-sample criterion, float alpha/lr).

    In float64, so that the comparison shows the math: in float32 the two criteria's different (equally exact)
    roundings, ~1e-7 per step, are amplified by training itself and reach ~1e-5 relative after ~45 steps."""
    spec = feature_spec_for("synthetic", tiny_synthetic)
    n_steps = 50
    runs = {}
    for solver in ("scipy", "device"):
        cfg = _cfg(spec.v_feat_dim, spec.t_feat_dim, matcher=solver, dropout=dropout, input_dropout=dropout * 5,
                   v2t_dropout=dropout)
        batches = _batches(tiny_synthetic, cfg, n_steps, full_length=True)
        torch.manual_seed(11)
        model = LDDETR(cfg).train().double()
        criterion = build_criterion(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        cpu = torch.device("cpu")
        losses = []
        if solver == "scipy":
            opt = official_optimizer(params, cfg.lr, cfg.wd, cpu)
            scaler = torch.amp.GradScaler("cpu", enabled=False)
            for i, batch in enumerate(batches):
                out = train_step(model, criterion, opt, scaler, params, _to_device(batch, cpu),
                                 alpha=warmup_alpha(cfg.distillation_coefficient, 0, i, n_steps), amp="off",
                                 device=cpu, grad_clip=cfg.grad_clip)
                losses.append(float(out["loss"].detach()))
        else:
            step = TrainStep(model, criterion, make_optimizer(params, cfg.lr, cfg.wd, cpu), params,
                             grad_clip=cfg.grad_clip, device=cpu)
            for i, batch in enumerate(batches):
                step.set_alpha(warmup_alpha(cfg.distillation_coefficient, 0, i, n_steps))
                losses.append(float(step(batch_to_device(batch, cpu))["loss"]))
        runs[solver] = torch.tensor(losses, dtype=torch.float64)
    torch.testing.assert_close(runs["device"], runs["scipy"], rtol=1e-5, atol=0)
    assert runs["scipy"][-10:].mean() < runs["scipy"][:10].mean()  # it trained
