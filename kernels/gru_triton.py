"""Persistent Triton kernel for the GRU recurrence (``kernels/gru.py``): ONE launch for all steps.

Input: gi = x W_ih^T + b_ih (B, L, 3H) (one GEMM, done by the caller), W_hh (3H, H), b_hh (3H,), steps (B,).
Output: the state after steps[b] steps from h0 = 0, (B, H) in gi's dtype. Gate order r, z, n (nn.GRU).

Algorithm of ``_gru_kernel`` (GPU mode, ``INTERPRET=False``)::

    grid = (S slices, G sample groups); program (j, g) owns hidden units U_j = [j*BH, (j+1)*BH) of the
    samples R_g = [g*BB, (g+1)*BB), and keeps W_hh[{r,z,n} x U_j, :] (3 x BH x H) in registers for all steps
    h = cell(gi[R_g, 0, U_j], gh = b_hh)                       # step 0 from h0 = 0 (no matmul)
    for t in 1 .. max(steps[R_g]) - 1:                         # the same count in every program of group g
        Hbuf[t % 2][R_g, U_j] = h;  grid_barrier(group g)      # publish the slice; wait for the S slices
        hfull = Hbuf[t % 2][R_g, :]                            # (BB, H): every slice of the previous state
        gh = hfull @ W_hh[., U_j]^T + b_hh[U_j]                # tl.dot (BB >= 16) or a broadcast-reduce (BB = 1)
        h = where(t < steps[R_g], cell(gi[R_g, t, U_j], gh, h), h)    # frozen after each sample's length
    out[R_g, U_j] = h

    cell: r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r * gh_n), h' = n + z (h - n)

Hbuf (2, B, H) fp32 is double-buffered: the barrier after writing Hbuf[t % 2] also guarantees every slice has
finished reading Hbuf[(t - 1) % 2] (its reads come before its arrival), so ONE barrier per step suffices. The
next step's gi tile is loaded before the barrier, so its latency hides behind the wait.

Grid barrier (``torch._inductor.runtime.triton_helpers.x_grid_barrier``'s sense-reversing scheme): one uint32
per sample group; slice 0 adds 0x80000000 - (S - 1), the others add 1, so each barrier adds exactly 2^31 —
the top bit flips and the low bits return to their value. Every program waits until the top bit differs
from the value it saw when it arrived. The counter is therefore valid at 0 or 0x80000000, never needs
resetting between launches (a cached zeroed buffer, CUDA-graph safe), and never overflows. Release on
arrival, acquire while spinning (GPU scope); the h loads after the barrier bypass L1 (``.cg``).

Co-residency: a grid barrier deadlocks unless every program of the grid is resident at once. The launcher
keeps S x G <= the number of SMs (one program per SM at most, each fits an SM by construction), as inductor
does for its cooperative reductions; a batch too large for that is split into several launches
(``_MAX_GROUPS``). A concurrent kernel on another stream can delay but not deadlock it, unless that kernel
also spins waiting on this one. Two launches must not run concurrently on different streams (they share the
cached counters).

Launch heuristic (``gru_settings``, d = 256 on a 132-SM H200): B < 16 -> BB = 1 (a broadcast-reduce: no
wasted rows), S = min(32, pow2 <= SMs / B) slices (B = 1: 32 slices of 8 units); B >= 16 -> BB = 16
(tl.dot needs 16 rows), G = B / 16 groups, S = min(H / 16, pow2 <= SMs / G) (B = 256: 16 groups x 8 slices
of 32 units). S >= 4 at d = 256 for every B.

Interpreter-safe mode (``INTERPRET=True``, what CPU tests run under ``TRITON_INTERPRET=1``): the interpreter
runs programs one after another, so a grid barrier would spin forever. One program per sample (S = 1,
BB = 1, BH = the whole hidden size) keeps h in registers: no barrier and no Hbuf. The GPU mode with S = 1 also
runs in the interpreter (its one-participant barrier passes at once), which tests Hbuf, the ping-pong and
the barrier arithmetic; only S > 1 needs a GPU.

Numerics: W_hh and gi are loaded and cast to fp32; h and every product and gate are fp32 (dots with
``input_precision`` from ``dot_precision``: "ieee" unless torch's fp32 matmul precision allows TF32);
tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1 ulp of 1; libdevice is unavailable in the interpreter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._utils import KernelInputError, dot_precision, interpreting, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None
    tl = None

_MAX_SLICES = 32       # programs sharing one barrier (more: more arrivals per step on one counter)
_MIN_SLICES = 4        # the split the design needs at d = 256 (fewer only for tiny hidden sizes)
_DOT_ROWS = 16         # tl.dot's minimum M/N on the GPU
_SEMS: dict = {}       # device -> cached zeroed uint32 barrier counters


if triton is not None:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _cell(gi_r, gi_z, gi_n, gh_r, gh_z, gh_n, h):
        """One GRU update in fp32: (BB, BH) tiles -> h' (BB, BH)."""
        r = tl.sigmoid(gi_r + gh_r)
        z = tl.sigmoid(gi_z + gh_z)
        n = _tanh(gi_n + r * gh_n)
        return n + z * (h - n)

    @triton.jit
    def _grid_barrier(sem, n_slices):
        """Wait until all ``n_slices`` programs of this sample group arrive (see the module docstring)."""
        tl.debug_barrier()  # every thread of this program has issued its stores
        one = tl.full([], 1, tl.uint32)
        if tl.program_id(0) == 0:
            inc = 0x80000000 - (n_slices.to(tl.uint32) - one)
        else:
            inc = one
        old = tl.atomic_add(sem, inc, sem="release", scope="gpu")
        flipped = False
        while not flipped:
            cur = tl.atomic_add(sem, 0, sem="acquire", scope="gpu")
            flipped = ((old ^ cur) & 0x80000000) != 0
        tl.debug_barrier()

    @triton.jit
    def _load_gi(ptrs, ok, H):
        """The program's r, z, n tiles of gi at one step (``ptrs``: gate r), fp32, zero where not ``ok``."""
        g_r = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        g_z = tl.load(ptrs + H, mask=ok, other=0.0).to(tl.float32)
        g_n = tl.load(ptrs + 2 * H, mask=ok, other=0.0).to(tl.float32)
        return g_r, g_z, g_n

    @triton.jit
    def _gru_kernel(
        # pointers
        GI, W_HH, B_HH, STEPS, OUT, HBUF, SEM,
        # sizes
        B, L, H,
        # strides (elements); the gate axis of gi and out is contiguous
        stride_gb, stride_gt, stride_ob,
        # meta-parameters
        BLOCK_B: tl.constexpr,  # samples per program (1: broadcast-reduce; >= 16: tl.dot)
        BLOCK_H: tl.constexpr,  # hidden units per program (the slice of W_hh it keeps)
        BLOCK_D: tl.constexpr,  # next power of 2 >= H (the reduction axis)
        USE_DOT: tl.constexpr,
        INTERPRET: tl.constexpr,  # True: one program per sample, h in registers, no barrier
        PRECISION: tl.constexpr,  # tl.dot input precision for the fp32 operands
    ):
        pid_h = tl.program_id(0)
        pid_b = tl.program_id(1)
        n_slices = tl.num_programs(0)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,) samples
        cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,) hidden units owned
        ks = tl.arange(0, BLOCK_D)  # (BD,) reduction axis
        row_ok = rows < B
        col_ok = cols < H
        k_ok = ks < H
        io_ok = row_ok[:, None] & col_ok[None, :]  # (BB, BH)
        rows64 = rows.to(tl.int64)

        n_steps = tl.minimum(tl.load(STEPS + rows, mask=row_ok, other=0), L)  # (BB,) int64; 0 for padding rows
        t_end = tl.max(n_steps, axis=0)

        # W_hh slice for the three gates, fp32, kept for every step
        if USE_DOT:  # (BD, BH): W_hh[g*H + cols, ks]^T
            w_off = cols[None, :] * H + ks[:, None]
            w_ok = k_ok[:, None] & col_ok[None, :]
        else:  # (BH, BD)
            w_off = cols[:, None] * H + ks[None, :]
            w_ok = col_ok[:, None] & k_ok[None, :]
        w_r = tl.load(W_HH + w_off, mask=w_ok, other=0.0).to(tl.float32)
        w_z = tl.load(W_HH + H * H + w_off, mask=w_ok, other=0.0).to(tl.float32)
        w_n = tl.load(W_HH + 2 * H * H + w_off, mask=w_ok, other=0.0).to(tl.float32)
        b_r = tl.load(B_HH + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        b_z = tl.load(B_HH + H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        b_n = tl.load(B_HH + 2 * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

        gi_ptrs = GI + rows64[:, None] * stride_gb + cols[None, :]  # (BB, BH) at step 0, gate r
        h_ptrs = HBUF + rows64[:, None] * H + ks[None, :]  # (BB, BD) full rows of buffer 0
        h_own = HBUF + rows64[:, None] * H + cols[None, :]  # (BB, BH) this program's slice of buffer 0
        h_ok = row_ok[:, None] & k_ok[None, :]
        sem = SEM + pid_b

        # step 0 from h0 = 0: gh = b_hh
        g_r, g_z, g_n = _load_gi(gi_ptrs, io_ok, H)
        h = _cell(g_r, g_z, g_n, b_r, b_z, b_n, tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32))
        h = tl.where((n_steps > 0)[:, None], h, 0.0)
        g_r, g_z, g_n = _load_gi(gi_ptrs + stride_gt, io_ok & (t_end > 1), H)  # prefetch step 1
        if not INTERPRET:
            if t_end > 1:  # the state after 1 step -> buffer 1 (nobody reads the last state: no barrier then)
                tl.store(h_own + B * H, h, mask=io_ok)
                _grid_barrier(sem, n_slices)

        for t in range(1, t_end):
            if INTERPRET:
                h_full = h  # BLOCK_H == BLOCK_D: this program owns every unit
            else:
                h_full = tl.load(h_ptrs + (t % 2) * B * H, mask=h_ok, other=0.0, cache_modifier=".cg")
            if USE_DOT:
                gh_r = tl.dot(h_full, w_r, input_precision=PRECISION)
                gh_z = tl.dot(h_full, w_z, input_precision=PRECISION)
                gh_n = tl.dot(h_full, w_n, input_precision=PRECISION)
            else:
                hb = h_full[:, None, :]  # (BB, 1, BD)
                gh_r = tl.sum(hb * w_r[None, :, :], axis=2)
                gh_z = tl.sum(hb * w_z[None, :, :], axis=2)
                gh_n = tl.sum(hb * w_n[None, :, :], axis=2)
            h_new = _cell(g_r, g_z, g_n, gh_r + b_r, gh_z + b_z, gh_n + b_n, h)
            h = tl.where((t < n_steps)[:, None], h_new, h)
            g_r, g_z, g_n = _load_gi(gi_ptrs + (t + 1) * stride_gt, io_ok & (t + 1 < t_end), H)
            if not INTERPRET:
                if t + 1 < t_end:
                    tl.store(h_own + ((t + 1) % 2) * B * H, h, mask=io_ok)
                    _grid_barrier(sem, n_slices)

        tl.store(OUT + rows64[:, None] * stride_ob + cols[None, :], h.to(OUT.dtype.element_ty), mask=io_ok)


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _use_dot(batch: int, block_d: int) -> bool:
    return batch >= _DOT_ROWS and block_d >= _MIN_SLICES * _DOT_ROWS


def max_batch_per_launch(hidden: int, sms: int) -> int:
    """The largest batch one co-resident launch takes with >= _MIN_SLICES slices per group (GPU mode)."""
    return _DOT_ROWS * max(1, sms // _MIN_SLICES) if _use_dot(_DOT_ROWS, next_power_of_2(hidden)) else sms


def gru_settings(batch: int, hidden: int, sms: int, interpret: bool) -> dict:
    """The launch: block sizes, slices S (grid axis 0) and groups G (axis 1), warps; S * G <= sms on a GPU."""
    block_d = next_power_of_2(hidden)
    if interpret:
        return dict(BLOCK_B=1, BLOCK_H=block_d, BLOCK_D=block_d, USE_DOT=False, INTERPRET=True,
                    slices=1, groups=batch, num_warps=4)
    use_dot = _use_dot(batch, block_d)
    block_b = _DOT_ROWS if use_dot else 1
    groups = triton.cdiv(batch, block_b)
    if groups > sms:
        raise KernelInputError(f"batch {batch} needs {groups} co-resident program groups, the GPU has {sms} SMs "
                               "(the launcher splits larger batches)")
    min_h = _DOT_ROWS if use_dot else 4
    slices = max(1, min(_MAX_SLICES, block_d // min_h, _floor_pow2(sms // groups)))
    block_h = block_d // slices
    w_elems = 3 * block_h * block_d  # fp32 W_hh slice per program, in registers
    return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_D=block_d, USE_DOT=use_dot, INTERPRET=False,
                slices=slices, groups=groups, num_warps=8 if w_elems > 8192 or block_b * block_d > 4096 else 4)


def _semaphores(device: torch.device, n: int) -> Tensor:
    """Zeroed uint32 barrier counters, cached per device (valid again after every complete launch)."""
    sem = _SEMS.get(device)
    if sem is None or sem.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.uint32, device=device)  # inside a graph: its own (captured) zeros
        sem = _SEMS[device] = torch.zeros(max(n, 256), dtype=torch.uint32, device=device)
    return sem


def gru_recurrence_triton(gi: Tensor, w_hh: Tensor, b_hh: Tensor, steps: Tensor, *,
                          config: dict | None = None) -> Tensor:
    """gi (B, L, 3H) (contiguous gate axis), w_hh (3H, H), b_hh (3H,), steps (B,) int64 in [1, L]
    -> (B, H) in gi's dtype. ``config`` overrides ``gru_settings`` (tests)."""
    if triton is None:
        raise KernelInputError("the Triton GRU kernel needs the triton package (pip install triton)")
    b, length, h3 = gi.shape
    hid = w_hh.shape[1]
    if gi.stride(2) != 1:
        gi = gi.contiguous()
    w_hh, b_hh, steps = w_hh.contiguous(), b_hh.contiguous(), steps.contiguous()
    if gi.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        from .gru import check_steps_values

        check_steps_values(steps, length)  # a host sync; skipped inside a CUDA graph (the kernel clamps to L)
    out = torch.empty((b, hid), dtype=gi.dtype, device=gi.device)
    if b == 0:
        return out
    interpret = gi.device.type != "cuda"
    sms = torch.cuda.get_device_properties(gi.device).multi_processor_count if not interpret else 1 << 20
    chunk = b if interpret or config is not None else max_batch_per_launch(hid, sms)
    if chunk < b:  # a batch too large for one co-resident grid: one launch per chunk of samples
        return torch.cat([gru_recurrence_triton(gi[i: i + chunk], w_hh, b_hh, steps[i: i + chunk])
                          for i in range(0, b, chunk)])
    cfg = dict(config) if config is not None else gru_settings(b, hid, sms, interpret)
    slices, groups = cfg.pop("slices"), cfg.pop("groups")
    hbuf = gi if cfg["INTERPRET"] else torch.empty((2, b, hid), dtype=torch.float32, device=gi.device)
    sem = _semaphores(gi.device, groups)
    _gru_kernel[(slices, groups)](
        gi, w_hh, b_hh, steps, out, hbuf, sem,
        b, length, hid,
        gi.stride(0), gi.stride(1), out.stride(0),
        PRECISION=dot_precision("auto", "matmul"), **cfg,
    )
    return out
