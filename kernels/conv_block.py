"""Fused inference kernel for the Convolutional Blocks (paper §3.3 eqs. 25-28, spec §2.5(d)).

One residual block of ``reference.conv_blocks``, with eval-mode BatchNorm folded into the convolutions::

    h = ReLU(Conv1'(x * m)) * m                    # Conv1' = BN1 o Conv1, folded (W1', b1')
    y = ReLU(x + Conv2'(h))                         # Conv2' = BN2 o Conv2, folded (W2', b2')

Conv: k=3, pad=1 over time; ``m`` is the valid-clip mask (the padding-invariant reference zeroes padded
clips before each conv). Folding: with s = gamma / sqrt(running_var + eps),
``W' = W * s[:, None, None]`` and ``b' = (b - running_mean) * s + beta`` (done once, in float64).

Algorithm of ``_residual_block_kernel`` (one launch per block, no intermediate written to memory)::

    program (row tile i, batch b, channel group g):
        t0 = i * (BLOCK_H - 2)                         # first output clip of the tile
        th = t0 - 1 + [0, BLOCK_H)                     # clips of h the tile needs: outputs +- 1 (the halo)
        acc1 = sum_{k, c-block} x[th + k - 1, b, c-block] @ W1'[k, c-block, :]     # implicit GEMM, (BH, D)
        h = ReLU(acc1 + b1') zeroed where th is outside [0, T) or padded
        H_k = shift(h, k - 1) for k = 0, 1, 2          # h[r + k - 1], as a dot with a 0/1 shift matrix
        for each output-channel block n of group g:
            y = ReLU(x[th, b, n] + sum_k H_k @ W2'[k, :, n] + b2'[n])   # stored for th in [t0, t0+BH-2)

Each tile recomputes the 2-clip halo of h instead of exchanging it with its neighbours through memory.
The shift is a tiny matmul (BH x BH x D, ~4 % of the block's FLOPs) because Triton cannot index a
register tile by a run-time offset; it is exact: each output element is one input element times 1.
The kernel reads any (T, B, D) or (B, T, D) layout through strides (the fuser's sequence-first layout
included), so no transposes. Channel groups (grid axis 2) split conv2's outputs across programs when the
batch is too small to fill the GPU; each group recomputes conv1 (a launch-heuristic trade-off).

Training needs BatchNorm batch statistics (a grid-wide reduction between the two convs), so train mode
uses the reference torch ops; ``spec/performance.md`` §4.2 estimates a fused training kernel at 1-3 % of a
training step at [32, 256, 75], so none is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import KernelInputError, check_hidden_dim, check_tensor, dot_precision, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------------------
@dataclass
class FoldedBlock:
    """One block's folded weights, laid out for the kernel: w (3, D_in, D_out), b (D_out,)."""

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor


def fold_conv_bn(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN folded into the conv: returns (W' (D_out, D_in, 3), b' (D_out,)) in float64."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    return w * scale[:, None, None], (b - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()


def fold_block(block: nn.Module, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> FoldedBlock:
    """A ``reference.conv_blocks.ConvolutionalBlock`` -> FoldedBlock: weights (3, D_in, D_out) in ``dtype``,
    biases fp32 (added to the fp32 accumulator), on ``device`` (default: the block's)."""
    w1, b1 = fold_conv_bn(block.conv1, block.bn1)
    w2, b2 = fold_conv_bn(block.conv2, block.bn2)
    device = w1.device if device is None else device
    as_kernel = lambda w: w.permute(2, 1, 0).contiguous().to(device, dtype)  # (D_out, D_in, 3) -> (3, D_in, D_out)
    as_bias = lambda b: b.to(device, torch.float32).contiguous()
    return FoldedBlock(as_kernel(w1), as_bias(b1), as_kernel(w2), as_bias(b2))


# --------------------------------------------------------------------------------------------------------
# torch path (CPU, or backend="torch"): the same folded math with aten ops
# --------------------------------------------------------------------------------------------------------
def residual_block_torch(x: Tensor, mask: Tensor | None, fb: FoldedBlock, seq_first: bool = True) -> Tensor:
    """Folded block with torch ops. x (T, B, D) if ``seq_first`` else (B, T, D); mask (B, T) bool or None."""
    xb = x.permute(1, 2, 0) if seq_first else x.transpose(1, 2)  # (B, D, T)
    m = None if mask is None else mask.to(x.dtype)[:, None, :]  # (B, 1, T)
    w1 = fb.w1.permute(2, 1, 0).to(x.dtype)  # (3, D_in, D_out) -> (D_out, D_in, 3)
    w2 = fb.w2.permute(2, 1, 0).to(x.dtype)
    h = F.conv1d(xb if m is None else xb * m, w1, fb.b1.to(x.dtype), padding=1).relu()
    h = h if m is None else h * m
    y = (xb + F.conv1d(h, w2, fb.b2.to(x.dtype), padding=1)).relu()
    return y.permute(2, 0, 1) if seq_first else y.transpose(1, 2)


# --------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _residual_block_kernel(
        # pointers
        X, Y, MASK, W1, B1, W2, B2,
        # sizes
        T, D, N_PER_PROG,  # N_PER_PROG: conv2 output blocks per program (run-time: one compile per dtype)
        # strides (elements); the channel stride is 1
        stride_xt, stride_xb, stride_yt, stride_yb, stride_mb, stride_mt,
        # meta-parameters
        BLOCK_H: tl.constexpr,  # clips of h per tile (outputs per tile = BLOCK_H - 2)
        BLOCK_D: tl.constexpr,  # next power of 2 >= D
        BLOCK_K: tl.constexpr,  # conv1 reduction block over input channels
        BLOCK_N: tl.constexpr,  # conv2 output-channel block
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands: "ieee" | "tf32" | "tf32x3"
    ):
        pid_t = tl.program_id(0).to(tl.int64)
        pid_b = tl.program_id(1).to(tl.int64)
        pid_g = tl.program_id(2).to(tl.int64)
        dt = X.dtype.element_ty

        r = tl.arange(0, BLOCK_H)
        th = pid_t * (BLOCK_H - 2) - 1 + r  # (BH,) clip index of each h row
        cd = tl.arange(0, BLOCK_D)
        x_row = X + pid_b * stride_xb

        # ---- conv1 (implicit GEMM over 3 taps x input-channel blocks), BN1 folded, ReLU, mask ----
        acc1 = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
        for k in tl.static_range(3):
            tx = th + (k - 1)
            ok = (tx >= 0) & (tx < T)
            if HAS_MASK:
                ok = ok & (tl.load(MASK + pid_b * stride_mb + tx * stride_mt, mask=ok, other=0) != 0)
            for c0 in range(0, BLOCK_D, BLOCK_K):  # a run-time loop: keeps the compiled kernel small
                ck = c0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x_row + tx[:, None] * stride_xt + ck[None, :],
                             mask=ok[:, None] & (ck[None, :] < D), other=0.0)  # (BH, BK)
                wk = tl.load(W1 + k * D * D + ck[:, None] * D + cd[None, :],
                             mask=(ck[:, None] < D) & (cd[None, :] < D), other=0.0)  # (BK, BD)
                acc1 = tl.dot(xk, wk, acc1, input_precision=PRECISION)
        b1 = tl.load(B1 + cd, mask=cd < D, other=0.0)
        h_ok = (th >= 0) & (th < T)
        if HAS_MASK:
            h_ok = h_ok & (tl.load(MASK + pid_b * stride_mb + th * stride_mt, mask=h_ok, other=0) != 0)
        h = tl.where(h_ok[:, None], tl.maximum(acc1 + b1[None, :], 0.0), 0.0).to(dt)  # (BH, BD)

        # ---- the halo: h shifted by one clip either way, as exact 0/1 matmuls ----
        rc = tl.arange(0, BLOCK_H)
        s_prev = tl.where(rc[None, :] == r[:, None] - 1, 1.0, 0.0).to(dt)  # row r picks h[r - 1]
        s_next = tl.where(rc[None, :] == r[:, None] + 1, 1.0, 0.0).to(dt)  # row r picks h[r + 1]
        h_prev = tl.dot(s_prev, h, input_precision=PRECISION).to(dt)
        h_next = tl.dot(s_next, h, input_precision=PRECISION).to(dt)

        # ---- conv2 + BN2 folded + residual + ReLU, per output-channel block ----
        out_ok = (r >= 1) & (r <= BLOCK_H - 2) & (th < T)
        for j in range(N_PER_PROG):
            n = (pid_g * N_PER_PROG + j) * BLOCK_N + tl.arange(0, BLOCK_N)
            w_ok = (cd[:, None] < D) & (n[None, :] < D)
            w_off = cd[:, None] * D + n[None, :]
            acc2 = tl.dot(h_prev, tl.load(W2 + w_off, mask=w_ok, other=0.0), input_precision=PRECISION)
            acc2 = tl.dot(h, tl.load(W2 + D * D + w_off, mask=w_ok, other=0.0), acc2, input_precision=PRECISION)
            acc2 = tl.dot(h_next, tl.load(W2 + 2 * D * D + w_off, mask=w_ok, other=0.0), acc2,
                          input_precision=PRECISION)
            b2 = tl.load(B2 + n, mask=n < D, other=0.0)
            io_ok = out_ok[:, None] & (n[None, :] < D)
            res = tl.load(x_row + th[:, None] * stride_xt + n[None, :], mask=io_ok, other=0.0).to(tl.float32)
            y = tl.maximum(res + acc2 + b2[None, :], 0.0)
            tl.store(Y + pid_b * stride_yb + th[:, None] * stride_yt + n[None, :], y.to(dt), mask=io_ok)


def _conv_settings(batch: int, length: int, d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch heuristic: tile height, channel blocks, channel groups, warps and pipeline depth.

    Shared memory at d=256 (sm_90, compiled offline with Triton 3.7): fp32 tiles with 2 stages need 303 KB,
    over the 227 KB limit, so fp32 runs with 1 stage (160 KB); fp16/bf16 with 2 stages need 80 KB.
    """
    block_d = next_power_of_2(d)
    block_h = 32 if length > 16 else 16
    block_n = min(64, block_d)
    n_blocks = block_d // block_n
    row_tiles = batch * triton.cdiv(length, block_h - 2)
    groups = 1
    if device.type == "cuda":  # split conv2's outputs over programs when the row tiles alone cannot fill the GPU
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while groups < n_blocks and row_tiles * groups < sms:
            groups *= 2
    return dict(BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_K=min(32, block_d), BLOCK_N=block_n,
                N_PER_PROG=n_blocks // groups, groups=groups,
                num_warps=8 if block_d >= 256 else 4, num_stages=1 if dtype == torch.float32 else 2)


def residual_block(x: Tensor, mask: Tensor | None, fb: FoldedBlock, *, seq_first: bool = True,
                   precision: str = "auto", out: Tensor | None = None) -> Tensor:
    """One fused residual block (Triton). x (T, B, D) if ``seq_first`` else (B, T, D), contiguous;
    mask (B, T) bool (True = valid clip) or None. Returns a tensor shaped like x."""
    if triton is None:
        raise KernelInputError("the Triton conv block needs the triton package (pip install triton)")
    check_tensor("x", x, ndim=3, dtypes=DTYPES)
    length, batch = (x.shape[0], x.shape[1]) if seq_first else (x.shape[1], x.shape[0])
    d = x.shape[2]
    check_hidden_dim("x", d)
    if fb.w1.shape != (3, d, d) or fb.w2.shape != (3, d, d):
        raise KernelInputError(f"folded weights are {tuple(fb.w1.shape)}, expected (3, {d}, {d}) for x {tuple(x.shape)}")
    if fb.w1.dtype != x.dtype or fb.w1.device != x.device:
        raise KernelInputError(f"folded weights are {fb.w1.dtype} on {fb.w1.device}, x is {x.dtype} on {x.device}")
    if mask is not None:
        check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
        if tuple(mask.shape) != (batch, length):
            raise KernelInputError(f"mask shape {tuple(mask.shape)} does not match x: expected ({batch}, {length})")
        mask = mask.view(torch.uint8)
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise KernelInputError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)}")
    if x.numel() == 0:
        return out
    cfg = _conv_settings(batch, length, d, x.dtype, x.device)
    groups, n_per_prog = cfg.pop("groups"), cfg.pop("N_PER_PROG")
    st, sb = (x.stride(0), x.stride(1)) if seq_first else (x.stride(1), x.stride(0))
    ot, ob = (out.stride(0), out.stride(1)) if seq_first else (out.stride(1), out.stride(0))
    m = mask if mask is not None else x  # dummy pointer when HAS_MASK is False
    grid = (triton.cdiv(length, cfg["BLOCK_H"] - 2), batch, groups)
    _residual_block_kernel[grid](
        x, out, m, fb.w1, fb.b1, fb.w2, fb.b2,
        length, d, n_per_prog,
        st, sb, ot, ob,
        m.stride(0) if mask is not None else 0, m.stride(1) if mask is not None else 0,
        HAS_MASK=mask is not None, PRECISION=dot_precision(precision, "conv"), **cfg,
    )
    return out


def residual_block_stack(x: Tensor, mask: Tensor | None, blocks: list[FoldedBlock], *, seq_first: bool = True,
                         precision: str = "auto") -> Tensor:
    """All N blocks, one launch each; ping-pongs between two buffers. Shapes as :func:`residual_block`."""
    if not x.is_contiguous():
        raise KernelInputError(f"x must be contiguous (shape {tuple(x.shape)}, strides {x.stride()}); call .contiguous()")
    bufs = [torch.empty_like(x), torch.empty_like(x)] if len(blocks) > 1 else [torch.empty_like(x)]
    for i, fb in enumerate(blocks):
        x = residual_block(x, mask, fb, seq_first=seq_first, precision=precision, out=bufs[i % len(bufs)])
    return x
