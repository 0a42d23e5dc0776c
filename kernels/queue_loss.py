"""Distill-Align loss against a MoCo queue without the (B, B+L) score matrix (Inf-CL style).

Shapes: B rows (batch), d hidden size (a multiple of 16), L queue length, N = B + L bank columns.
``q`` = Gv (B, d) online query, ``qm`` = Gvm (B, d) momentum query, ``keys_m`` = Gtm (B, d) momentum keys
(the first B bank columns, stored row-major), ``queue`` (d, L), ``tau`` a 0-d tensor, ``alpha`` a float.
(t2v is the same with Gt, Gtm, Gvm and the video queue.)

Math, per direction (``reference/distill_align.py``)::

    1. bank = [keys_m^T | queue]                     (d, N)   -- never materialised (no torch.cat)
    2. S  = q  @ bank / tau,  Sm = qm @ bank / tau   (B, N)   -- never materialised either
    3. Y  = alpha * softmax(Sm) + (1 - alpha) * I    (I: ones on the first B diagonal entries), no grad
    4. loss = mean_i( -sum_j Y_ij log_softmax(S)_ij )
            = mean_i( LSE_j S_ij - alpha * sum_j softmax(Sm)_ij S_ij ) - (1 - alpha) * mean_i S_ii
              (sum_j Y_ij = 1, so -sum_j Y_ij (S_ij - LSE_i) = LSE_i - sum_j Y_ij S_ij)
            =          "stream"                                      - (1 - alpha) * mean_i "diag"

The diagonal S_ii = q_i . keys_m_i / tau is a (B,) row-dot. ``QueueStreamLoss`` computes ``stream`` and,
with ``diag_weight`` c, ``stream - c * mean_i S_ii``: program 0 holds the keys_m tile, so it reads S_ii off
the diagonal of its S tile (forward) and adds -c g / B to dS_ii (backward). ``distill_align_loss`` uses
c = 1 - alpha; this replaces ~10 small torch ops per step whose CPU launch time, not their GPU time, is what
counts at B = 32 (measured below). Gradients flow to q and tau; qm, keys_m and queue are detached momentum
features (the reference builds banks and targets under ``torch.no_grad``), so they get none.

Forward (one read of the queue): a grid over column tiles of the virtual bank. Program 0 takes the B
``keys_m`` columns, programs 1..P take ``tiles_per_prog`` queue tiles of BLOCK_L columns each (an axis 1
covers row blocks of BLOCK_B when B > BLOCK_B). Each program loads a key tile (d x BLOCK_L) once, computes
both S and Sm tiles with ``tl.dot`` and keeps per-row online partials over its columns::

    m  = max_j S_ij,   s  = sum_j exp(S_ij - m)
    mm = max_j Sm_ij,  sm = sum_j exp(Sm_ij - mm),   w = sum_j exp(Sm_ij - mm) * S_ij

written as fp32 partials (5, P+1, B); a one-program combine kernel merges them (log-sum-exp merge:
M = max_p m_p, s = sum_p s_p exp(m_p - M); the same for (mm, sm), with w rescaled by exp(mm_p - MM)) into
``lse = M + log s``, ``lse_m = MM + log sm``, ``E = w / sm`` = sum_j softmax(Sm)_ij S_ij, and the scalar
``mean_i(lse_i - alpha * E_i - c * S_ii)`` (one launch instead of ~20 small torch ops). Online partials are
what let one pass over the queue give both the normaliser and the target-weighted sum: a two-pass softmax
would read the queue twice.

Backward (recompute; only lse, lse_m (B,) are saved, never S): with g the upstream scalar gradient,

    d stream / d S_ij = g / B * (softmax(S)_ij - alpha * softmax(Sm)_ij) =: dS_ij
                        (softmax(S)_ij = exp(S_ij - lse_i), softmax(Sm)_ij = exp(Sm_ij - lse_m_i);
                         Sm only feeds the no-grad target, so it is a constant here)
    dq_i   = sum_j dS_ij k_j / tau                      (S_ij = q_i . k_j / tau)
    d tau  = sum_ij dS_ij dS_ij/dtau = -(1 / tau) sum_ij dS_ij S_ij

The same grid recomputes S and Sm tile by tile and writes fp32 partials dq (P+1, B, d) and
-(1/tau) sum_j dS_ij S_ij (P+1, B); torch sums each over programs (deterministic: no atomics). Memory is
O((P+1) B d) instead of O(B (B+L)), and no host sync happens anywhere (tau and g are read through pointers).
(With c != 0, dS_ii also carries -c g / B.)

Numerics: dots take the operands' dtype (fp32 with ``input_precision`` "ieee" for parity or "tf32" for
speed; fp16/bf16 natively) and accumulate in fp32; all softmax statistics are fp32. In the backward dot the
fp32 dS tile is cast to the key dtype (the FlashAttention convention) for fp16/bf16 inputs.

``queue_similarity`` is the plain scores kernel S = normalize(q) @ bank / tau (B, N) for a (d, N) bank.

Measured on one H200 (B=32, d=256, L=65536, both directions, forward + backward of ``distill_align_loss``
vs ``distill_align_loss_torch``; GPU = kernel time summed by the profiler): bf16 138 us vs 466 us, fp32
"tf32" 239 vs 589 us, fp32 "ieee" 845 vs 763 us (Triton's FMA dots: use "tf32" or bf16 for speed); B=256
bf16 944 vs 1436 us. At B=32 both are CPU-bound on that host (~1.3 ms vs ~1.5 ms of CPU per call, most of
it the autograd engine and launch overhead).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import KernelInputError, check_hidden_dim, check_tensor, dot_precision, interpreting, next_power_of_2
from ._utils import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch fallbacks still work
    triton = None
    tl = None

__all__ = ["QueueStreamLoss", "distill_align_loss", "distill_align_loss_torch", "queue_similarity"]

# Allocate the partial buffers with NaN instead of torch.empty so a partial that no program writes shows up
# as NaN in the result (tests switch it on; LDDETR_KERNELS_POISON=1 does the same).
_POISON = os.environ.get("LDDETR_KERNELS_POISON", "0") not in ("", "0")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch heuristic knobs (module-level so tests can shrink them to exercise several tiles/row blocks).
_MAX_BLOCK_B = 64          # row block; B above it adds a grid axis over row blocks
_SMEM_BUDGET = 160 * 1024  # bytes of shared memory we plan for (H100/H200 allow 227 KiB per block)
# (BLOCK_L, num_stages, num_warps) in order of preference, by operand kind. Measured on an H200 at
# B=32, d=256, L=65536 (kernel-only, per direction): 16-bit (64, 3, 4) fwd 25 us / bwd 25 us; tf32
# (32, 2, 4) 40 / 59 us; fp32 "ieee" (FMA dots) needs num_stages=1 and 8 warps (fwd 2.6 ms at 2 stages,
# 93 us at 1) and BLOCK_L=16 in the backward (240 us vs 961 us at 32).
_GPU_TILE_PREFS = {
    "16bit": ((64, 3, 4), (64, 2, 4), (32, 2, 4), (16, 2, 4), (16, 1, 4)),
    "tf32": ((32, 2, 4), (16, 2, 4), (16, 1, 4)),
    "ieee": ((32, 1, 8), (16, 1, 8)),
    "ieee_bwd": ((16, 1, 8),),
}
_PROGRAMS_PER_SM = 2       # queue programs ~ 2 x SM count, each looping over tiles_per_prog tiles
_CPU_BLOCK_L = 64          # interpreter: cost ~ programs x tiles, so few, mid-sized tiles
_CPU_PROGRAMS = 4
_COMBINE_BLOCK_P = 64      # partial rows per step of the one-program combine kernel


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_rows(q_ptr, qm_ptr, tau_ptr, pid_b, B, D, stride_qb, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        """The program's BLOCK_B rows of q and qm (zero past B / D), their offsets, masks, and 1 / tau."""
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_d = tl.arange(0, BLOCK_D)
        mask_b = offs_b < B
        mask_q = mask_b[:, None] & (offs_d[None, :] < D)
        q_off = offs_b[:, None] * stride_qb + offs_d[None, :]
        q = tl.load(q_ptr + q_off, mask=mask_q, other=0.0)
        qm = tl.load(qm_ptr + q_off, mask=mask_q, other=0.0)
        inv_tau = 1.0 / tl.load(tau_ptr).to(tl.float32)
        return offs_b, offs_d, mask_b, mask_q, q, qm, inv_tau

    @triton.jit
    def _score_tiles(q, qm, k_ptr, offs_d, offs_n, D, n_cols, stride_kd, stride_kn, inv_tau,
                     INPUT_PRECISION: tl.constexpr):
        """Load the key tile k (BLOCK_D, BLOCK_L) of columns offs_n (< n_cols) and return k, S, Sm, mask."""
        mask_n = offs_n < n_cols
        k_ptrs = k_ptr + offs_d[:, None].to(tl.int64) * stride_kd + offs_n[None, :] * stride_kn
        k = tl.load(k_ptrs, mask=(offs_d[:, None] < D) & mask_n[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * inv_tau
        sm = tl.dot(qm, k, input_precision=INPUT_PRECISION) * inv_tau
        return k, s, sm, mask_n

    @triton.jit
    def _fwd_update(q, qm, k_ptr, offs_b, offs_d, offs_n, D, n_cols, stride_kd, stride_kn, inv_tau,
                    m, s, mm, sm, w, dg, INPUT_PRECISION: tl.constexpr, DIAG: tl.constexpr):
        """Fold one key tile into the online row statistics (m, s) of S and (mm, sm, w) of Sm; with DIAG
        (keys_m tiles) also pick up the diagonal S_ii into dg."""
        _k, st, smt, mask_n = _score_tiles(q, qm, k_ptr, offs_d, offs_n, D, n_cols, stride_kd, stride_kn,
                                           inv_tau, INPUT_PRECISION)
        st_m = tl.where(mask_n[None, :], st, float("-inf"))
        m_new = tl.maximum(m, tl.max(st_m, axis=1))  # finite: every tile has a valid column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(st_m - m_new[:, None]), axis=1)
        smt_m = tl.where(mask_n[None, :], smt, float("-inf"))
        mm_new = tl.maximum(mm, tl.max(smt_m, axis=1))
        p = tl.exp(smt_m - mm_new[:, None])  # 0 on masked columns, where st is the finite 0
        scale = tl.exp(mm - mm_new)
        sm = sm * scale + tl.sum(p, axis=1)
        w = w * scale + tl.sum(p * st, axis=1)
        if DIAG:
            dg += tl.sum(tl.where(offs_b[:, None] == offs_n[None, :], st, 0.0), axis=1)
        return m_new, s, mm_new, sm, w, dg

    @triton.jit
    def _stream_fwd_kernel(
        # pointers
        q_ptr, qm_ptr, keys_ptr, queue_ptr, tau_ptr, part_ptr, diag_ptr,
        # sizes
        B, D, L, n_queue_tiles, tiles_per_prog,
        # strides (the last dim of every tensor is contiguous)
        stride_qb, stride_kb, stride_ud,
        # meta-parameters
        BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Online (max, sum-exp) partials of S and Sm, and the Sm-softmax-weighted sum of S, per program.

        Program (c, r): rows r*BLOCK_B.., c == 0 -> the B keys_m columns, c >= 1 -> queue tiles
        (c-1)*tiles_per_prog .. + tiles_per_prog. Writes part[0..4, c, rows] = m, s, mm, sm, w, and
        program 0 also diag[rows] = S_ii.
        """
        pid_c = tl.program_id(0).to(tl.int64)
        pid_b = tl.program_id(1).to(tl.int64)
        n_progs = tl.num_programs(0).to(tl.int64)
        offs_b, offs_d, mask_b, mask_q, q, qm, inv_tau = _load_rows(q_ptr, qm_ptr, tau_ptr, pid_b, B, D,
                                                                    stride_qb, BLOCK_B, BLOCK_D)

        m = tl.full([BLOCK_B], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_B], tl.float32)
        mm = tl.full([BLOCK_B], float("-inf"), tl.float32)
        sm = tl.zeros([BLOCK_B], tl.float32)
        w = tl.zeros([BLOCK_B], tl.float32)
        dg = tl.zeros([BLOCK_B], tl.float32)

        # keys_m (B, d) row-major seen as a (d, B) bank: stride 1 over d, stride_kb over columns
        n_key_tiles = tl.where(pid_c == 0, tl.cdiv(B, BLOCK_L), 0)
        for t in range(0, n_key_tiles):
            offs_n = t * BLOCK_L + tl.arange(0, BLOCK_L)
            m, s, mm, sm, w, dg = _fwd_update(q, qm, keys_ptr, offs_b, offs_d, offs_n, D, B, 1, stride_kb,
                                              inv_tau, m, s, mm, sm, w, dg, INPUT_PRECISION, True)
        # queue (d, L): stride_ud over d, stride 1 over columns
        tile_lo = tl.maximum(pid_c - 1, 0) * tiles_per_prog
        tile_hi = tl.where(pid_c == 0, 0, tl.minimum(tile_lo + tiles_per_prog, n_queue_tiles))
        for t in range(tile_lo, tile_hi):
            offs_n = t * BLOCK_L + tl.arange(0, BLOCK_L)
            m, s, mm, sm, w, dg = _fwd_update(q, qm, queue_ptr, offs_b, offs_d, offs_n, D, L, stride_ud, 1,
                                              inv_tau, m, s, mm, sm, w, dg, INPUT_PRECISION, False)

        out = part_ptr + pid_c * B + offs_b
        plane = n_progs * B
        tl.store(out, m, mask=mask_b)
        tl.store(out + plane, s, mask=mask_b)
        tl.store(out + 2 * plane, mm, mask=mask_b)
        tl.store(out + 3 * plane, sm, mask=mask_b)
        tl.store(out + 4 * plane, w, mask=mask_b)
        tl.store(diag_ptr + offs_b, dg, mask=mask_b & (pid_c == 0))

    @triton.jit
    def _bwd_update(q, qm, k_ptr, offs_b, offs_d, offs_n, D, n_cols, stride_kd, stride_kn, inv_tau,
                    lse, lse_m, coef, alpha, diag_weight, mask_b, acc, dss,
                    INPUT_PRECISION: tl.constexpr, DIAG: tl.constexpr):
        """Recompute S, Sm on one key tile; acc += dS @ k^T, dss += sum_j dS * S. With DIAG (keys_m tiles)
        dS_ii also gets the -diag_weight * g / B of the diagonal term."""
        k, st, smt, mask_n = _score_tiles(q, qm, k_ptr, offs_d, offs_n, D, n_cols, stride_kd, stride_kn,
                                          inv_tau, INPUT_PRECISION)
        ds = coef * (tl.exp(st - lse[:, None]) - alpha * tl.exp(smt - lse_m[:, None]))
        if DIAG:
            ds = tl.where(offs_b[:, None] == offs_n[None, :], ds - diag_weight * coef, ds)
        ds = tl.where(mask_b[:, None] & mask_n[None, :], ds, 0.0)
        acc += tl.dot(ds.to(k.dtype), tl.trans(k), input_precision=INPUT_PRECISION)
        dss += tl.sum(ds * st, axis=1)
        return acc, dss

    @triton.jit
    def _stream_bwd_kernel(
        # pointers
        q_ptr, qm_ptr, keys_ptr, queue_ptr, tau_ptr, lse_ptr, lse_m_ptr, g_ptr, dq_part_ptr, dss_part_ptr,
        # sizes and scalars
        B, D, L, n_queue_tiles, tiles_per_prog, alpha, diag_weight,
        # strides
        stride_qb, stride_kb, stride_ud,
        # meta-parameters
        BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Partial dq (before the sum over programs) and partial dtau = -(1/tau) sum_j dS_ij S_ij, same grid
        as forward."""
        alpha = tl.cast(alpha, tl.float32)  # a float scalar arrives as fp64 from torch.compile (inductor)
        diag_weight = tl.cast(diag_weight, tl.float32)
        pid_c = tl.program_id(0).to(tl.int64)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_b, offs_d, mask_b, mask_q, q, qm, inv_tau = _load_rows(q_ptr, qm_ptr, tau_ptr, pid_b, B, D,
                                                                    stride_qb, BLOCK_B, BLOCK_D)
        coef = tl.load(g_ptr).to(tl.float32) / B
        lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
        lse_m = tl.load(lse_m_ptr + offs_b, mask=mask_b, other=0.0)

        acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        dss = tl.zeros([BLOCK_B], tl.float32)

        n_key_tiles = tl.where(pid_c == 0, tl.cdiv(B, BLOCK_L), 0)
        for t in range(0, n_key_tiles):
            offs_n = t * BLOCK_L + tl.arange(0, BLOCK_L)
            acc, dss = _bwd_update(q, qm, keys_ptr, offs_b, offs_d, offs_n, D, B, 1, stride_kb, inv_tau,
                                   lse, lse_m, coef, alpha, diag_weight, mask_b, acc, dss, INPUT_PRECISION, True)
        tile_lo = tl.maximum(pid_c - 1, 0) * tiles_per_prog
        tile_hi = tl.where(pid_c == 0, 0, tl.minimum(tile_lo + tiles_per_prog, n_queue_tiles))
        for t in range(tile_lo, tile_hi):
            offs_n = t * BLOCK_L + tl.arange(0, BLOCK_L)
            acc, dss = _bwd_update(q, qm, queue_ptr, offs_b, offs_d, offs_n, D, L, stride_ud, 1, inv_tau,
                                   lse, lse_m, coef, alpha, diag_weight, mask_b, acc, dss, INPUT_PRECISION, False)

        dq_ptrs = dq_part_ptr + (pid_c * B + offs_b[:, None]) * D + offs_d[None, :]
        tl.store(dq_ptrs, acc * inv_tau, mask=mask_q)
        tl.store(dss_part_ptr + pid_c * B + offs_b, -dss * inv_tau, mask=mask_b)

    @triton.jit
    def _stream_combine_kernel(
        # pointers
        part_ptr, diag_ptr, lse_ptr, lse_m_ptr, loss_ptr,
        # sizes and scalars
        B, P, plane, alpha, diag_weight,
        # meta-parameters
        BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One program: merge the (5, P, B) forward partials (plane = P * B) into lse, lse_m (B,) and the scalar
        loss = mean_i(lse_i - alpha * w_i / sm_i - diag_weight * S_ii) (two passes over P: maxima, then
        rescaled sums)."""
        alpha = tl.cast(alpha, tl.float32)  # a float scalar arrives as fp64 from torch.compile (inductor)
        diag_weight = tl.cast(diag_weight, tl.float32)
        total = tl.zeros([BLOCK_B], tl.float32)
        for r0 in range(0, B, BLOCK_B):
            offs_b = r0 + tl.arange(0, BLOCK_B)
            mask_b = offs_b < B
            big_m = tl.full([BLOCK_B], float("-inf"), tl.float32)
            big_mm = tl.full([BLOCK_B], float("-inf"), tl.float32)
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                mask = (offs_p[:, None] < P) & mask_b[None, :]
                ptrs = part_ptr + offs_p[:, None].to(tl.int64) * B + offs_b[None, :]
                big_m = tl.maximum(big_m, tl.max(tl.load(ptrs, mask=mask, other=float("-inf")), axis=0))
                big_mm = tl.maximum(big_mm, tl.max(tl.load(ptrs + 2 * plane, mask=mask, other=float("-inf")),
                                                   axis=0))
            big_m = tl.where(mask_b, big_m, 0.0)  # rows past B: no -inf - -inf below
            big_mm = tl.where(mask_b, big_mm, 0.0)
            s_tot = tl.zeros([BLOCK_B], tl.float32)
            sm_tot = tl.zeros([BLOCK_B], tl.float32)
            w_tot = tl.zeros([BLOCK_B], tl.float32)
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                mask = (offs_p[:, None] < P) & mask_b[None, :]
                ptrs = part_ptr + offs_p[:, None].to(tl.int64) * B + offs_b[None, :]
                m = tl.load(ptrs, mask=mask, other=float("-inf"))
                s = tl.load(ptrs + plane, mask=mask, other=0.0)
                mm = tl.load(ptrs + 2 * plane, mask=mask, other=float("-inf"))
                sm = tl.load(ptrs + 3 * plane, mask=mask, other=0.0)
                w = tl.load(ptrs + 4 * plane, mask=mask, other=0.0)
                s_tot += tl.sum(s * tl.exp(m - big_m[None, :]), axis=0)
                scale = tl.exp(mm - big_mm[None, :])
                sm_tot += tl.sum(sm * scale, axis=0)
                w_tot += tl.sum(w * scale, axis=0)
            s_tot = tl.where(mask_b, s_tot, 1.0)
            sm_tot = tl.where(mask_b, sm_tot, 1.0)
            lse = big_m + tl.log(s_tot)
            lse_m = big_mm + tl.log(sm_tot)
            tl.store(lse_ptr + offs_b, lse, mask=mask_b)
            tl.store(lse_m_ptr + offs_b, lse_m, mask=mask_b)
            dg = tl.load(diag_ptr + offs_b, mask=mask_b, other=0.0)
            total += tl.where(mask_b, lse - alpha * (w_tot / sm_tot) - diag_weight * dg, 0.0)
        tl.store(loss_ptr, tl.sum(total, axis=0) / B)

    @triton.jit
    def _similarity_kernel(
        # pointers
        q_ptr, bank_ptr, tau_ptr, out_ptr,
        # sizes
        B, D, N,
        # strides
        stride_qb, stride_bd, stride_ob,
        # meta-parameters
        NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """out[rows, cols] = normalize(q[rows]) @ bank[:, cols] / tau for one (row block, column tile)."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_b = tl.program_id(1).to(tl.int64)

        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_b = offs_b < B
        mask_n = offs_n < N
        mask_d = offs_d < D
        q = tl.load(q_ptr + offs_b[:, None] * stride_qb + offs_d[None, :],
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        if NORMALIZE:  # F.normalize: x / max(||x||_2, 1e-12), in fp32
            qf = q.to(tl.float32)
            norm = tl.sqrt(tl.sum(qf * qf, axis=1))
            q = (qf / tl.maximum(norm, 1e-12)[:, None]).to(q_ptr.dtype.element_ty)
        k = tl.load(bank_ptr + offs_d[:, None].to(tl.int64) * stride_bd + offs_n[None, :],
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) / tl.load(tau_ptr).to(tl.float32)
        tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], s.to(out_ptr.dtype.element_ty),
                 mask=mask_b[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------
# Launch settings and input checks
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    block_b: int
    block_l: int
    block_d: int
    n_queue_tiles: int
    tiles_per_prog: int
    n_programs: int   # column programs, including program 0 (the keys_m columns)
    n_row_blocks: int
    num_warps: int
    num_stages: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.n_programs, self.n_row_blocks)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_settings(b: int, n_cols: int, d: int, dtype: torch.dtype, device: torch.device,
                     precision: str = "ieee", backward: bool = False) -> _Launch:
    """Blocks, tiles per program, warps and stages for a (b rows) x (n_cols queue columns) launch.

    * BLOCK_B = next_pow2(b) in [16, _MAX_BLOCK_B] (tl.dot needs >= 16 rows); BLOCK_D = next_pow2(d).
    * GPU: the first (BLOCK_L, num_stages, num_warps) of _GPU_TILE_PREFS[16bit | tf32 | ieee] whose shared
      memory -- q and qm tiles (2 * BLOCK_B * BLOCK_D) plus max(1, num_stages) key tiles (BLOCK_D * BLOCK_L)
      -- fits _SMEM_BUDGET (BLOCK_B halves if none fits); queue programs ~ _PROGRAMS_PER_SM x SM count, each
      looping over ``tiles_per_prog`` tiles, so the partials stay (P+1, B, d) with P a few hundred at most.
    * Interpreter: BLOCK_L = 64 and at most _CPU_PROGRAMS queue programs.

    ``precision`` is the resolved dot precision ("ieee" | "tf32"; it only matters for fp32 operands);
    ``backward`` picks the "<kind>_bwd" preferences where there are some (the backward kernel's own tiling:
    its partials do not depend on the forward's).
    """
    block_b = max(16, min(_MAX_BLOCK_B, next_power_of_2(b)))
    block_d = next_power_of_2(d)
    es = dtype.itemsize
    if device.type == "cuda":
        kind = "16bit" if es == 2 else ("tf32" if precision == "tf32x3" else precision)
        prefs = _GPU_TILE_PREFS.get(kind + "_bwd", _GPU_TILE_PREFS[kind]) if backward else _GPU_TILE_PREFS[kind]
        while True:
            fits = [p for p in prefs
                    if (2 * block_b * block_d + max(1, p[1]) * block_d * p[0]) * es <= _SMEM_BUDGET]
            if fits or block_b == 16:
                block_l, num_stages, num_warps = fits[0] if fits else prefs[-1]
                break
            block_b //= 2
        if block_b * block_d >= 64 * 256:  # large q/qm/dq tiles: spread the registers over 8 warps
            num_warps = 8
        target = max(1, _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else
                                                     torch.cuda.current_device()) - 1)
    else:
        block_l, num_stages, num_warps, target = _CPU_BLOCK_L, 1, 4, _CPU_PROGRAMS
    n_queue_tiles = triton.cdiv(n_cols, block_l) if n_cols > 0 else 0
    tiles_per_prog = max(1, triton.cdiv(n_queue_tiles, target)) if n_queue_tiles else 1
    n_queue_progs = triton.cdiv(n_queue_tiles, tiles_per_prog) if n_queue_tiles else 0
    return _Launch(block_b, block_l, block_d, n_queue_tiles, tiles_per_prog, 1 + n_queue_progs,
                   triton.cdiv(b, block_b), num_warps, num_stages)


def _require_triton(device: torch.device) -> None:
    if triton is None:
        raise KernelInputError("the queue-loss kernels need the triton package (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise KernelInputError(f"Triton kernels on {device.type} tensors need TRITON_INTERPRET=1 (set before "
                               "triton is imported); use the torch backend instead")


def _check_tau(tau: Tensor, device: torch.device) -> None:
    if not isinstance(tau, Tensor) or tau.numel() != 1 or not tau.is_floating_point():
        desc = f"shape {tuple(tau.shape)}, dtype {tau.dtype}" if isinstance(tau, Tensor) else type(tau).__name__
        raise KernelInputError(f"tau must be a one-element floating tensor (a 0-d parameter), got {desc}")
    if tau.device != device:
        raise KernelInputError(f"tau is on {tau.device}, the features on {device}")


def _check_same(ref_name: str, ref: Tensor, name: str, t: Tensor, *, shape: bool = True) -> None:
    if t.dtype != ref.dtype:
        raise KernelInputError(f"{name} dtype {t.dtype} does not match {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        raise KernelInputError(f"{name} is on {t.device}, {ref_name} on {ref.device}")
    if shape and t.shape != ref.shape:
        raise KernelInputError(f"{name} shape {tuple(t.shape)} does not match {ref_name} shape {tuple(ref.shape)}")


def _check_stream_inputs(q: Tensor, qm: Tensor, keys_m: Tensor, queue: Tensor, tau: Tensor) -> None:
    check_tensor("q", q, ndim=2, dtypes=_FLOAT_DTYPES)
    check_hidden_dim(f"q (shape {tuple(q.shape)})", q.shape[1])
    if q.shape[0] == 0:
        raise KernelInputError(f"q must have at least one row, got shape {tuple(q.shape)}")
    for name, t in (("qm", qm), ("keys_m", keys_m)):
        check_tensor(name, t, ndim=2, dtypes=_FLOAT_DTYPES)
        _check_same("q", q, name, t)
    check_tensor("queue", queue, ndim=2, dtypes=_FLOAT_DTYPES)
    _check_same("q", q, "queue", queue, shape=False)
    if queue.shape[0] != q.shape[1]:
        raise KernelInputError(f"queue must be (d, L) with d = {q.shape[1]} (from q), got shape "
                               f"{tuple(queue.shape)}")
    _check_tau(tau, q.device)
    _require_triton(q.device)


def _partials(shape: tuple[int, ...], device: torch.device) -> Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def _stream_forward(q: Tensor, qm: Tensor, keys_m: Tensor, queue: Tensor, tau: Tensor, alpha: float,
                    precision: str = "auto", diag_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss 0-d fp32, lse (B,) fp32, lse_m (B,) fp32), loss = stream - diag_weight * mean_i S_ii.

    Two launches: the column-tile kernel writes the (5, P+1, B) partials (and S_ii from program 0), one
    program merges them. See the module docstring.
    """
    _check_stream_inputs(q, qm, keys_m, queue, tau)
    b, d = q.shape
    n = queue.shape[1]
    prec = dot_precision(precision)
    cfg = _launch_settings(b, n, d, q.dtype, q.device, prec)
    part = _partials((5, cfg.n_programs, b), q.device)
    stats = _partials((3, b), q.device)  # lse, lse_m, S_ii
    loss = _partials((), q.device)
    _stream_fwd_kernel[cfg.grid](
        q, qm, keys_m, queue, tau, part, stats[2],
        b, d, n, cfg.n_queue_tiles, cfg.tiles_per_prog,
        q.stride(0), keys_m.stride(0), queue.stride(0),
        BLOCK_B=cfg.block_b, BLOCK_L=cfg.block_l, BLOCK_D=cfg.block_d,
        INPUT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _stream_combine_kernel[(1,)](
        part, stats[2], stats[0], stats[1], loss,
        b, cfg.n_programs, cfg.n_programs * b, float(alpha), float(diag_weight),
        BLOCK_B=min(32, cfg.block_b), BLOCK_P=_COMBINE_BLOCK_P, num_warps=4,
    )
    return loss, stats[0], stats[1]


def _stream_backward(q: Tensor, qm: Tensor, keys_m: Tensor, queue: Tensor, tau: Tensor, alpha: float,
                     lse: Tensor, lse_m: Tensor, grad: Tensor, precision: str = "auto", diag_weight: float = 0.0,
                     *, validate: bool = True) -> tuple[Tensor, Tensor]:
    """-> (dq like q, dtau like tau) for the upstream gradient ``grad`` (0-d) of ``_stream_forward``'s loss.

    ``validate=False`` skips the input checks (QueueStreamLoss.backward: its tensors passed them in forward).
    """
    b, d = q.shape
    if validate:
        _check_stream_inputs(q, qm, keys_m, queue, tau)
        for name, t in (("lse", lse), ("lse_m", lse_m)):
            check_tensor(name, t, ndim=1, dtypes=(torch.float32,), contiguous=False)
            if t.shape[0] != b or t.stride(0) != 1 or t.device != q.device:
                raise KernelInputError(f"{name} must be ({b},) contiguous on {q.device}, got {tuple(t.shape)} "
                                       f"on {t.device}")
        if grad.numel() != 1 or grad.device != q.device:
            raise KernelInputError(f"grad must be a one-element tensor on {q.device}, got shape "
                                   f"{tuple(grad.shape)} on {grad.device}")
    n = queue.shape[1]
    prec = dot_precision(precision)
    cfg = _launch_settings(b, n, d, q.dtype, q.device, prec, backward=True)
    dq_part = _partials((cfg.n_programs, b, d), q.device)
    dtau_part = _partials((cfg.n_programs, b), q.device)
    _stream_bwd_kernel[cfg.grid](
        q, qm, keys_m, queue, tau, lse, lse_m, grad, dq_part, dtau_part,
        b, d, n, cfg.n_queue_tiles, cfg.tiles_per_prog, float(alpha), float(diag_weight),
        q.stride(0), keys_m.stride(0), queue.stride(0),
        BLOCK_B=cfg.block_b, BLOCK_L=cfg.block_l, BLOCK_D=cfg.block_d,
        INPUT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dq = dq_part.sum(0).to(q.dtype)
    dtau = dtau_part.sum().reshape(tau.shape).to(tau.dtype)
    return dq, dtau


class QueueStreamLoss(torch.autograd.Function):
    """stream = mean_i( LSE_j S_ij - alpha * sum_j softmax(Sm)_ij S_ij ), S = q @ [keys_m^T | queue] / tau.

    With ``diag_weight`` w (default 0) it returns stream - w * mean_i S_ii: w = 1 - alpha gives one direction
    of the Distill-Align loss with the diagonal term in the kernels (program 0 holds the keys_m tile, so S_ii
    costs nothing there and saves the handful of torch ops -- and their CPU launch time -- of doing it
    outside). Gradients flow to ``q`` and ``tau`` only (qm, keys_m, queue are detached momentum features).

    The gradients for a unit upstream gradient are computed in ``forward`` (the second pass over the queue,
    which backward would otherwise make) and only scaled in ``backward``: the queue is not saved for backward,
    so the training forward may enqueue into it in place (the model does, right after the loss), and the
    queue bytes read per step are the same.
    """

    @staticmethod
    def forward(ctx, q: Tensor, qm: Tensor, keys_m: Tensor, queue: Tensor, tau: Tensor, alpha: float,
                precision: str = "auto", diag_weight: float = 0.0) -> Tensor:
        loss, lse, lse_m = _stream_forward(q, qm, keys_m, queue, tau, alpha, precision, diag_weight)
        dq = dtau = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[4]:
            one = torch.ones((), dtype=torch.float32, device=q.device)
            dq, dtau = _stream_backward(q, qm, keys_m, queue, tau, float(alpha), lse, lse_m, one, precision,
                                        float(diag_weight), validate=False)
        ctx.save_for_backward(dq, dtau)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        dq, dtau = ctx.saved_tensors
        dq = dq * grad.to(dq.dtype) if ctx.needs_input_grad[0] else None
        dtau = dtau * grad.to(dtau.dtype) if ctx.needs_input_grad[4] else None
        return dq, None, None, None, dtau, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _as_tau(tau, like: Tensor) -> Tensor:
    if isinstance(tau, Tensor):
        return tau
    return torch.tensor(float(tau), dtype=torch.float32, device=like.device)


def _check_align_inputs(gv, gt, gv_m, gt_m, txt_queue, vid_queue) -> None:
    for name, t in (("gv", gv), ("gt", gt), ("gv_m", gv_m), ("gt_m", gt_m)):
        check_tensor(name, t, ndim=2, dtypes=_FLOAT_DTYPES)
        if t.shape != gv.shape:
            raise KernelInputError(f"{name} shape {tuple(t.shape)} does not match gv shape {tuple(gv.shape)}")
    check_hidden_dim(f"gv (shape {tuple(gv.shape)})", gv.shape[1])
    for name, t in (("txt_queue", txt_queue), ("vid_queue", vid_queue)):
        check_tensor(name, t, ndim=2, dtypes=_FLOAT_DTYPES)
        if t.shape[0] != gv.shape[1]:
            raise KernelInputError(f"{name} must be (d, L) with d = {gv.shape[1]}, got shape {tuple(t.shape)}")


def distill_align_loss(gv: Tensor, gt: Tensor, gv_m: Tensor, gt_m: Tensor, txt_queue: Tensor,
                       vid_queue: Tensor, tau: Tensor, alpha: float, precision: str = "auto", *,
                       backend: str = "auto") -> Tensor:
    """loss_align of ``reference.distill_align.DistillAlign.forward`` (same value and gradients for gv, gt, tau).

    gv, gt (B, d) online features; gv_m, gt_m (B, d) momentum features (no gradient); txt_queue, vid_queue
    (d, L) contiguous; tau a 0-d tensor (the learnable temperature; clamp it beforehand as the reference
    does in training); alpha a float. Momentum features and queues are cast to gv's dtype if they differ (a
    copy of the queue: keep the queues in the feature dtype to avoid it). ``backend`` "auto" is Triton on CUDA
    and torch elsewhere (``LDDETR_KERNELS`` overrides; see kernels/_utils.py).
    """
    tau = _as_tau(tau, gv)
    if resolve_backend(backend, gv.device) == "torch":
        return distill_align_loss_torch(gv, gt, gv_m, gt_m, txt_queue, vid_queue, tau, alpha, precision)
    _check_align_inputs(gv, gt, gv_m, gt_m, txt_queue, vid_queue)
    dt = gv.dtype  # QueueStreamLoss gives no gradient to the momentum features / queues: no detach needed
    gv_m, gt_m, txt_queue, vid_queue = (t if t.dtype == dt else t.detach().to(dt)
                                        for t in (gv_m, gt_m, txt_queue, vid_queue))
    # one direction each: stream - (1 - alpha) * mean_i S_ii, the diagonal S_ii taken in the kernels
    if torch.is_grad_enabled() and (gv.requires_grad or gt.requires_grad or tau.requires_grad):
        loss_v2t = QueueStreamLoss.apply(gv, gv_m, gt_m, txt_queue, tau, float(alpha), precision, 1.0 - alpha)
        loss_t2v = QueueStreamLoss.apply(gt, gt_m, gv_m, vid_queue, tau, float(alpha), precision, 1.0 - alpha)
    else:  # no gradient wanted: the forward pass alone (QueueStreamLoss would also compute the gradients)
        loss_v2t = _stream_forward(gv, gv_m, gt_m, txt_queue, tau, float(alpha), precision, 1.0 - alpha)[0]
        loss_t2v = _stream_forward(gt, gt_m, gv_m, vid_queue, tau, float(alpha), precision, 1.0 - alpha)[0]
    return (loss_v2t + loss_t2v) / 2


def distill_align_loss_torch(gv: Tensor, gt: Tensor, gv_m: Tensor, gt_m: Tensor, txt_queue: Tensor,
                             vid_queue: Tensor, tau: Tensor, alpha: float, precision: str = "auto") -> Tensor:
    """The same loss in plain torch (the reference math; materialises the (B, B+L) scores).

    ``precision`` is accepted for signature parity and ignored (torch follows its own matmul precision).
    """
    def one_direction(q: Tensor, q_m: Tensor, k_m: Tensor, queue: Tensor) -> Tensor:
        with torch.no_grad():
            bank = torch.cat([k_m.t(), queue.to(k_m.dtype)], dim=1)  # (d, B+L)
            y = alpha * F.softmax(q_m @ bank / tau, dim=1)
            y[:, : q.shape[0]].diagonal().add_(1 - alpha)  # + (1 - alpha) * I
        return -(F.log_softmax(q @ bank / tau, dim=1) * y).sum(1).mean()

    return (one_direction(gv, gv_m, gt_m, txt_queue) + one_direction(gt, gt_m, gv_m, vid_queue)) / 2


def queue_similarity(q: Tensor, bank: Tensor, tau, *, normalize: bool = True, precision: str = "auto",
                     out: Tensor | None = None, backend: str = "auto") -> Tensor:
    """S = normalize(q) @ bank / tau, (B, N) for q (B, d) and a contiguous bank (d, N); no autograd.

    ``normalize`` L2-normalises the rows of q in the kernel (F.normalize, eps 1e-12). The result is fp32 for
    fp32 inputs and q's dtype otherwise; ``out`` (that dtype, (B, N), contiguous rows) is written in place
    if given. ``backend`` "auto" is Triton on CUDA and torch elsewhere (see kernels/_utils.py).
    """
    tau = _as_tau(tau, q)
    if resolve_backend(backend, q.device) == "torch":
        qn = F.normalize(q, dim=-1) if normalize else q
        res = (qn @ bank) / tau.to(qn.dtype)
        if out is not None:
            out.copy_(res)
            return out
        return res
    check_tensor("q", q, ndim=2, dtypes=_FLOAT_DTYPES)
    check_hidden_dim(f"q (shape {tuple(q.shape)})", q.shape[1])
    check_tensor("bank", bank, ndim=2, dtypes=_FLOAT_DTYPES)
    _check_same("q", q, "bank", bank, shape=False)
    if bank.shape[0] != q.shape[1]:
        raise KernelInputError(f"bank must be (d, N) with d = {q.shape[1]} (from q), got shape "
                               f"{tuple(bank.shape)}")
    _check_tau(tau, q.device)
    _require_triton(q.device)
    b, d = q.shape
    n = bank.shape[1]
    out_dtype = q.dtype
    if out is None:
        out = torch.empty((b, n), dtype=out_dtype, device=q.device)
    else:
        check_tensor("out", out, ndim=2, dtypes=(out_dtype,), contiguous=False)
        if tuple(out.shape) != (b, n) or out.stride(1) != 1 or out.device != q.device:
            raise KernelInputError(f"out must be ({b}, {n}) on {q.device} with contiguous rows, got shape "
                                   f"{tuple(out.shape)}, strides {out.stride()} on {out.device}")
    if b == 0 or n == 0:
        return out
    prec = dot_precision(precision)
    cfg = _launch_settings(b, n, d, q.dtype, q.device, prec)
    grid = (triton.cdiv(n, cfg.block_l), cfg.n_row_blocks)
    _similarity_kernel[grid](
        q, bank, tau, out,
        b, d, n,
        q.stride(0), bank.stride(0), out.stride(0),
        NORMALIZE=bool(normalize), BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_l, BLOCK_D=cfg.block_d,
        INPUT_PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
