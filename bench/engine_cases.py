"""Setup factories for the model-level benchmarks (engine vs reference, training step), shared by pytest-benchmark
(``bench/test_engine.py``) and the GPU script (``bench/gpu.py``) so both time exactly the same things.
The model math comes from ``reference/``; the candidates from ``engine/`` and ``kernels/``."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from reference import LDDETR, LDDETRConfig


def randomize_bn_stats_(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm running statistics (fresh models have mean 0 / var 1), so BN folding matters."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.3)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model


def random_model(cfg: LDDETRConfig, device) -> LDDETR:
    """A random-weight reference model in eval mode with random BN statistics."""
    return randomize_bn_stats_(LDDETR(cfg)).eval().to(device)


def reference_forward(model: LDDETR, inputs, dtype: torch.dtype = torch.float32) -> Callable[[], dict]:
    """The reference eager forward as a user runs it: no_grad, autocast for bf16/fp16."""
    device = inputs[0].device.type

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return model(*inputs)

    return run


@dataclass
class TrainingCase:
    cfg: LDDETRConfig
    batch: dict
    reference_step: Callable[[], float]
    engine_step: Callable[[], dict]
    compiled_step: Callable[[], Callable[[], dict]]  # builds (lazily: it compiles) the --compile step


def training_case(batch_size: int, clips: int, device, *, queue_length: int = 65536, amp: str = "off",
                  real_dims: bool = False, compile_backend: str = "inductor") -> TrainingCase:
    """A training batch from the synthetic dataset and three steps on copies of one model:

    * ``reference_step``: the plain eager loop (default AdamW, the loss read back and checked every step);
    * ``engine_step``: ``engine.train.train_step`` (fused AdamW, ``kernels.apply``, deferred read-back);
    * ``compiled_step()``: the same under ``torch.compile(dynamic=True)``, as ``python -m engine.train --compile``.
    ``real_dims``: SlowFast+CLIP 2818 / text 512 features (else the synthetic dataset's small defaults)."""
    import kernels
    from engine.data import MomentDataset, load_annotations, make_loader
    from engine.features import feature_spec_for
    from engine.synthetic import make_synthetic_dataset
    from engine.train import _autocast, _to_device, make_optimizer, train_step
    from reference.losses import build_criterion

    device = torch.device(device)
    dims = dict(slowfast_dim=2304, clip_dim=512, text_dim=512) if real_dims else {}
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_dataset(tmp, n_train=batch_size, n_val=1, min_clips=clips, max_clips=clips, **dims)
        spec = feature_spec_for("synthetic", tmp)
        ann = load_annotations(sorted(Path(tmp).glob("*train*.jsonl"))[0])
        batch = next(iter(make_loader(MomentDataset(ann, tmp, spec, dataset="synthetic"), batch_size)))
    batch = _to_device(batch, device)
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=spec.v_feat_dim, t_feat_dim=spec.t_feat_dim,
                              queue_length=queue_length)
    criterion = build_criterion(cfg)
    ref = LDDETR(cfg).train().to(device)
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=cfg.lr, weight_decay=cfg.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def reference_step() -> float:
        with _autocast(device, amp):
            out = ref(batch["video"], batch["video_mask"], batch["text"], batch["text_mask"], alpha=0.4)
        out = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}
        loss = criterion(out, batch["targets"])["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        ref_opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref_params, cfg.grad_clip)
        scaler.step(ref_opt)
        scaler.update()
        return float(loss.detach())

    def engine_variant(compiled: bool) -> Callable[[], dict]:
        model = kernels.apply(copy.deepcopy(ref), "auto")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg.lr, cfg.wd, device)
        run = torch.compile(model, dynamic=True, backend=compile_backend) if compiled else model
        return lambda: train_step(run, criterion, opt, scaler, params, batch, alpha=0.4, amp=amp, device=device,
                                  grad_clip=cfg.grad_clip, compiled=compiled)

    return TrainingCase(cfg, batch, reference_step, engine_variant(False), lambda: engine_variant(True))
