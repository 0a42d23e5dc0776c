"""Setup factories for the kernel benchmarks: one per kernel, each returning named callables
(``provider -> fn()``) over the same inputs, so pytest-benchmark (``bench/test_kernels.py``) and the GPU
script (``bench/gpu_kernels.py``) time exactly the same things. Baselines come from ``reference/``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.conv_block import fold_block, residual_block_stack, residual_block_torch
from reference.conv_blocks import ConvolutionalBlocks
from reference.distill_align import DistillAlign
from reference.heads import HighlightDetectionHead


@dataclass
class Case:
    name: str
    fns: dict[str, Callable[[], object]]
    bytes: dict[str, int] = field(default_factory=dict)  # the fewest bytes each provider must move
    flops: int = 0
    meta: dict = field(default_factory=dict)


def random_bn_blocks(d: int, n: int, device) -> ConvolutionalBlocks:
    m = ConvolutionalBlocks(d, n)
    with torch.no_grad():
        for blk in m.blocks:
            for bn in (blk.bn1, blk.bn2):
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_(1.0, 0.3)
                bn.bias.normal_(0, 0.3)
    return m.eval().to(device)


def conv_stack_case(batch: int, length: int = 75, d: int = 256, n_blocks: int = 5, device="cuda",
                    providers: tuple[str, ...] = ("reference", "torch_folded", "triton_tf32", "triton_bf16"),
                    compile_mode: str | None = None) -> Case:
    """The Convolutional Blocks at inference: x (T, B, d) sequence-first with ~10 % padded clips."""
    m = random_bn_blocks(d, n_blocks, device)
    x = torch.randn(length, batch, d, device=device)
    lengths = torch.randint(int(length * 0.8), length + 1, (batch,), device=device)
    mask = torch.arange(length, device=device)[None] < lengths[:, None]
    folded = {dt: [fold_block(b, dt, x.device) for b in m.blocks] for dt in (torch.float32, torch.bfloat16, torch.float16)}
    xs = {dt: x.to(dt) for dt in folded}
    m_bf16 = copy.deepcopy(m).to(torch.bfloat16)
    fns: dict[str, Callable[[], object]] = {
        "reference": lambda: m(x, mask),
        "reference_bf16": lambda: m_bf16(xs[torch.bfloat16], mask),
        "torch_folded": lambda: _folded_torch(x, mask, folded[torch.float32]),
        "triton_ieee": lambda: residual_block_stack(x, mask, folded[torch.float32], precision="ieee"),
        "triton_tf32": lambda: residual_block_stack(x, mask, folded[torch.float32], precision="tf32"),
        "triton_tf32x3": lambda: residual_block_stack(x, mask, folded[torch.float32], precision="tf32x3"),
        "triton_bf16": lambda: residual_block_stack(xs[torch.bfloat16], mask, folded[torch.bfloat16]),
        "triton_fp16": lambda: residual_block_stack(xs[torch.float16], mask, folded[torch.float16]),
    }
    if compile_mode is not None:
        compiled = torch.compile(m, mode=compile_mode, dynamic=False)
        fns["compiled"] = lambda: compiled(x, mask)
    fns = {k: _no_grad(v) for k, v in fns.items() if k in providers or k == "compiled"}
    act = length * batch * d
    w = n_blocks * 2 * 3 * d * d
    nbytes = {k: (n_blocks * 3 * act + w) * (2 if ("bf16" in k or "fp16" in k) else 4) for k in fns}
    return Case(f"conv_stack_B{batch}_T{length}", fns, nbytes, flops=n_blocks * 2 * 2 * 3 * d * d * length * batch,
                meta=dict(batch=batch, length=length, d=d, n_blocks=n_blocks))


def _folded_torch(x, mask, blocks):
    for fb in blocks:
        x = residual_block_torch(x, mask, fb)
    return x


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def queue_case(b: int = 32, queue_length: int = 65536, d: int = 256, device="cuda", alpha: float = 0.4,
               providers: tuple[str, ...] | None = None) -> Case:
    """Distill Align at the official size: features (b, d), queues (d, L), tau 0.07."""
    from kernels.queue_loss import distill_align_loss, queue_similarity

    da = DistillAlign(d, queue_length).to(device)
    feats = [F.normalize(torch.randn(b, d, device=device), dim=-1) for _ in range(4)]
    gv, gt, gv_m, gt_m = [f.requires_grad_(i < 2) for i, f in enumerate(feats)]
    q = torch.randn(b, d, device=device)

    def torch_loss():
        return da.align_loss(gv, gt, gv_m, gt_m, alpha)

    def fused_loss(precision):
        return lambda: distill_align_loss(gv, gt, gv_m, gt_m, da.txt_queue, da.vid_queue, da.temp, alpha,
                                          precision=precision, backend="triton")

    def fwd_bwd(loss_fn):
        def run():
            loss = loss_fn()
            gv.grad = gt.grad = da.temp.grad = None
            loss.backward()
        return run

    fns = {
        "similarity_torch": _no_grad(lambda: F.normalize(q, dim=-1) @ da.vid_queue / da.temp),
        "similarity_triton_tf32": _no_grad(lambda: queue_similarity(q, da.vid_queue, da.temp, precision="tf32", backend="triton")),
        "similarity_triton_ieee": _no_grad(lambda: queue_similarity(q, da.vid_queue, da.temp, precision="ieee", backend="triton")),
        "similarity_triton_tf32x3": _no_grad(lambda: queue_similarity(q, da.vid_queue, da.temp, precision="tf32x3",
                                                                      backend="triton")),
        "loss_fwd_torch": _no_grad(torch_loss),
        "loss_fwd_triton_tf32": _no_grad(fused_loss("tf32")),
        "loss_fwd_triton_ieee": _no_grad(fused_loss("ieee")),
        "loss_fwd_triton_tf32x3": _no_grad(fused_loss("tf32x3")),
        "loss_fwdbwd_torch": fwd_bwd(torch_loss),
        "loss_fwdbwd_triton_tf32": fwd_bwd(fused_loss("tf32")),
        "loss_fwdbwd_triton_ieee": fwd_bwd(fused_loss("ieee")),
        "loss_fwdbwd_triton_tf32x3": fwd_bwd(fused_loss("tf32x3")),
    }
    if providers is not None:
        fns = {k: v for k, v in fns.items() if k in providers}
    qbytes = d * queue_length * 4
    nbytes = {}
    for k in fns:
        if k.startswith("similarity"):
            nbytes[k] = qbytes + b * queue_length * 4  # the queue once + S written
        elif k.startswith("loss_fwd_"):
            nbytes[k] = 2 * qbytes  # each queue once
        else:
            nbytes[k] = 4 * qbytes  # each queue once forward, once backward
    return Case(f"queue_b{b}_L{queue_length}", fns, nbytes, flops=2 * 2 * 2 * b * d * (queue_length + b),
                meta=dict(b=b, queue_length=queue_length, d=d))


def gru_case(batch: int, length: int = 75, d: int = 256, device="cuda",
             providers: tuple[str, ...] = ("nn_gru", "torch_loop", "triton", "nn_gru_bf16", "triton_bf16")) -> Case:
    """The saliency GRU at inference: x (B, L, d), each sample read at its own length steps[b] (80-100 % of L).

    "nn_gru" is what ``reference/heads.py`` does (nn.GRU over the padded batch, then a gather at steps - 1;
    cuDNN on CUDA); "torch_loop" / "triton" are ``kernels.gru.gru_last_state``'s backends; *_bf16 runs the
    same in bf16 (weights and inputs)."""
    from kernels.gru import gru_last_state

    gru = HighlightDetectionHead(d).gru.to(device).eval().requires_grad_(False)
    x = torch.randn(batch, length, d, device=device)
    steps = torch.randint(max(1, int(length * 0.8)), length + 1, (batch,), device=device)
    steps[0] = length
    rows = torch.arange(batch, device=device)
    grus = {torch.float32: gru, torch.bfloat16: copy.deepcopy(gru).to(torch.bfloat16)}
    xs = {dt: x.to(dt) for dt in grus}

    def nn_gru(dt):
        return lambda: grus[dt](xs[dt])[0][rows, steps - 1]

    def op(dt, backend):
        g = grus[dt]
        w = (g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)
        return lambda: gru_last_state(xs[dt], w[0], w[1], w[2], w[3], steps, backend=backend)

    fns = {"nn_gru": nn_gru(torch.float32), "nn_gru_bf16": nn_gru(torch.bfloat16),
           "torch_loop": op(torch.float32, "torch"), "torch_loop_bf16": op(torch.bfloat16, "torch"),
           "triton": op(torch.float32, "triton"), "triton_bf16": op(torch.bfloat16, "triton")}
    fns = {k: _no_grad(v) for k, v in fns.items() if k in providers}
    nbytes = {k: (6 * d * d + batch * length * d) * (2 if k.endswith("bf16") else 4) for k in fns}
    return Case(f"gru_B{batch}_L{length}_d{d}", fns, nbytes, flops=12 * batch * length * d * d,
                meta=dict(batch=batch, length=length, d=d))
