"""The training step as one device program: no host sync, no host<->device copy, one graph (issue 15).

``TrainStep(batch)`` runs forward (momentum update and enqueue included), the criterion with the device
matcher, backward, grad-norm clipping and the fused AdamW update, and returns the loss terms as detached
device tensors. What it keeps off the host:

* the batch arrives on the device already (:func:`batch_to_device`: one ``non_blocking`` copy per tensor
  from the loader's pinned memory, before the step; the list form of the span targets is not moved);
* alpha (the Distill Align warm-up) is a 0-dim device tensor set with ``fill_`` before the step (a kernel
  argument, not a copy), so a compiled step never re-specialises on it; the learning rate is a 0-dim device
  tensor in the optimizer's param group (the scheduler writes it in place);
* the optimizer update is ``torch._fused_adamw_`` called directly on the optimizer's own state
  (:func:`adamw_step_`, the kernel ``AdamW(fused=True).step()`` runs, without its Python wrappers, which
  dynamo refuses to trace); its state is created up front (:func:`init_adamw_state`), so even the first step
  allocates nothing lazily and ``optimizer.state_dict()`` stays the torch format (resume works unchanged);
* the caller sums the returned losses on the device and reads them, with the finiteness check, every N
  steps (``engine.train``: ``CHECK_EVERY``).

``torch._dynamo.explain`` of the step (``trace_autograd_ops=True``) gives one graph with the backward and
``_fused_adamw_`` inside (tests/test_step.py); on torch 2.13 compiled autograd does not combine with
tracing ``backward()`` into the same graph, so it is not used. fp16 autocast needs the GradScaler's host
read of ``found_inf``: it keeps the eager loop of :func:`engine.train.train_step`.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

#: batch keys the step needs on the device (the rest, e.g. "meta" and the list "span_labels", stays)
DEVICE_KEYS = ("video", "video_mask", "text", "text_mask")
TARGET_KEYS = ("span_targets", "span_mask", "saliency_pos_labels", "saliency_neg_labels", "saliency_all_labels")


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """The step's inputs on ``device``: one ``non_blocking`` copy per tensor (pinned memory makes it async).

    Returns a new dict with the tensors of :data:`DEVICE_KEYS` and ``targets`` restricted to
    :data:`TARGET_KEYS` (padded spans; the per-sample list is left behind), ``meta`` passed through."""
    out = {k: batch[k].to(device, non_blocking=True) for k in DEVICE_KEYS if k in batch}
    if "targets" in batch:
        out["targets"] = {k: v.to(device, non_blocking=True) for k, v in batch["targets"].items() if k in TARGET_KEYS}
    if "meta" in batch:
        out["meta"] = batch["meta"]
    return out


def make_optimizer(params: list, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW as the official code configures it (one group), with the learning rate a 0-dim device tensor and
    the fused kernel where torch has one for the device (CPU and CUDA), else foreach + capturable."""
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True,
                                capturable=device.type == "cuda")
    lr_to_device_(opt, device)  # after construction: AdamW's range check of a tensor lr reads it back
    init_adamw_state(opt)
    return opt


def lr_to_device_(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """After ``load_state_dict``: each group's lr back to a 0-dim tensor on ``device``, the same value."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if torch.is_tensor(lr):
            group["lr"] = lr.to(device)
        else:  # fp64 on CPU (the fused kernel then sees the value a Python float gives it); fp32 on CUDA
            dtype = torch.float64 if device.type == "cpu" else torch.float32
            group["lr"] = torch.tensor(lr, dtype=dtype, device=device)


@torch.no_grad()
def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the per-parameter state AdamW would create lazily on its first step (same keys and dtypes)."""
    for group in optimizer.param_groups:
        fused_or_capturable = bool(group.get("fused")) or bool(group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused_or_capturable
                             else torch.tensor(0.0))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@torch.no_grad()
def adamw_step_(optimizer: torch.optim.Optimizer) -> None:
    """One AdamW update of every parameter that has a gradient.

    With ``fused=True`` this is what ``optimizer.step()`` runs (``_foreach_add_`` on the steps, then one
    ``_fused_adamw_`` per group), called directly so that dynamo can put it in the step's graph; otherwise
    ``optimizer.step()`` itself."""
    if not all(g.get("fused") for g in optimizer.param_groups):
        optimizer.step()
        return
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [optimizer.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], steps,
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
            amsgrad=group["amsgrad"], maximize=group["maximize"], grad_scale=None, found_inf=None)


class TrainStep:
    """forward + criterion + backward + clip + AdamW on a device batch; returns detached loss terms.

    Args:
        run_model: the model as called (plain, DDP-wrapped, or its compiled forward).
        criterion: a :class:`reference.losses.SetCriterion` (``solver="device"`` for a sync-free step).
        optimizer: from :func:`make_optimizer`; params: the trainable parameters (clipped together).
    """

    def __init__(self, run_model: Callable, criterion, optimizer: torch.optim.Optimizer, params: list, *,
                 grad_clip: float, device: torch.device, amp: str = "off", compiled: bool = False):
        if amp == "fp16":
            raise ValueError("TrainStep: fp16 needs the GradScaler's host read; use engine.train.train_step")
        self.run_model, self.criterion, self.optimizer, self.params = run_model, criterion, optimizer, params
        self.grad_clip, self.device, self.amp, self.compiled = grad_clip, device, amp, compiled
        # set with set_alpha before each step; fp64 like a Python float, so that (1 - alpha) rounds as it does
        self.alpha = torch.zeros((), dtype=torch.float64, device=device)

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(alpha)  # a fill kernel with the value as argument: no copy, no sync

    def _autocast(self):
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def __call__(self, batch: dict) -> dict[str, Tensor]:
        # allow_rnn: dynamo traces the highlight head's GRU instead of breaking the graph there (set by the
        # caller when the whole step is traced: a config patch inside a traced frame splits the graph)
        patch = (torch._dynamo.config.patch(allow_rnn=True) if self.compiled and not torch.compiler.is_compiling()
                 else contextlib.nullcontext())
        with self._autocast(), patch:
            outputs = self.run_model(batch["video"], batch["video_mask"], batch["text"], batch["text_mask"],
                                     alpha=self.alpha)
        outputs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in outputs.items()}
        losses = self.criterion(outputs, batch["targets"])
        detached = {k: v.detach() + 0 for k, v in losses.items()}  # fresh tensors, not views of the graph
        for p in self.params:  # = optimizer.zero_grad(set_to_none=True), which dynamo does not trace
            p.grad = None
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)  # foreach on CPU and CUDA
        adamw_step_(self.optimizer)
        return detached


__all__ = ["TrainStep", "batch_to_device", "make_optimizer", "adamw_step_", "init_adamw_state",
           "lr_to_device_"]
