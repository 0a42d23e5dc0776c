"""Distill-Align queue loss kernels (kernels/queue_loss.py) against reference/distill_align.py and fp64 torch.

On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set below before triton is imported
when there is no GPU); on a CUDA machine the same tests compile them for the GPU. Inputs are fresh random
each run (``fresh_seed`` prints the seed; LDDETR_TEST_SEED=<n> replays one), queue lengths are not multiples
of the column tile, and every partial buffer is NaN-poisoned so an unwritten element fails a test.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from kernels import queue_loss as ql  # noqa: E402
from kernels._utils import KernelInputError  # noqa: E402
from kernels.queue_loss import (  # noqa: E402
    QueueStreamLoss,
    distill_align_loss,
    distill_align_loss_torch,
    queue_similarity,
)
from reference.distill_align import DistillAlign  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6  # fp32 "ieee" parity
pytestmark = pytest.mark.usefixtures("fresh_seed")  # conftest: a new, printed seed per test


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """rtol 1e-5, atol 1e-6 relative to the tensor's scale (max |expected|, at least 1): fp32 rounding of
    S = q.k / tau grows with |S| ~ 1/tau, so a tiny entry of a large gradient carries the row's absolute error."""
    atol = ATOL * max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=RTOL, atol=atol,
                               msg=(lambda m: f"{name}: {m}") if name else None)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Partial buffers start as NaN: a (program, row) slot no program writes turns the result into NaN."""
    monkeypatch.setattr(ql, "_POISON", True)


def unit(*shape, device, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, device=device, dtype=torch.float64), dim=-1).to(dtype)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def stream_fp64(q, qm, keys_m, queue, tau, alpha):
    """The streaming part in float64 torch: mean_i(LSE_j S_ij - alpha * sum_j softmax(Sm)_ij S_ij)."""
    bank = torch.cat([keys_m.t(), queue], 1).double()
    s = q.double() @ bank / tau.double()
    with torch.no_grad():
        p_m = F.softmax(qm.double() @ bank / tau.double(), dim=1)
    return (torch.logsumexp(s, 1) - alpha * (p_m * s).sum(1)).mean()


def reference_case(b, d, length, tau, device):
    mod = DistillAlign(hidden_dim=d, queue_length=length, temperature=tau).to(device)
    feats = [unit(b, d, device=device) for _ in range(4)]
    return mod, feats


def run_reference(mod, feats, alpha):
    gv, gt, gv_m, gt_m = [f.clone().requires_grad_(True) for f in feats]
    mod.temp.grad = None
    loss, _ = mod(gv, gt, gv_m, gt_m, alpha)
    loss.backward()
    assert gv_m.grad is None and gt_m.grad is None
    return loss.detach(), gv.grad, gt.grad, mod.temp.grad.clone()


def run_ours(mod, feats, alpha, **kw):
    gv, gt, gv_m, gt_m = [f.clone().requires_grad_(True) for f in feats]
    tau = mod.temp.detach().clone().requires_grad_(True)
    loss = distill_align_loss(gv, gt, gv_m, gt_m, mod.txt_queue, mod.vid_queue, tau, alpha, **kw)
    loss.backward()
    assert gv_m.grad is None and gt_m.grad is None  # momentum features get no gradient
    return loss.detach(), gv.grad, gt.grad, tau.grad


@pytest.mark.parametrize("b,d,length", [(1, 32, 200), (3, 64, 300), (5, 32, 300)])
@pytest.mark.parametrize("tau", [0.07, 0.3])
def test_distill_align_matches_reference(b, d, length, tau, device):
    mod, feats = reference_case(b, d, length, tau, device)
    alpha = float(torch.rand(()) * 0.98 + 0.01)
    ref = run_reference(mod, feats, alpha)
    ours = run_ours(mod, feats, alpha, precision="ieee", backend="triton")
    for name, a, r in zip(("loss_align", "d gv", "d gt", "d temp"), ours, ref):
        assert_close(a, r, name)
        assert a.shape == r.shape


def test_several_row_blocks_tiles_and_key_tiles(monkeypatch, device):
    """B > BLOCK_B (3 row blocks), B > BLOCK_L (2 key tiles in program 0), several tiles per program, and a
    combine kernel that loops over row blocks and partial chunks."""
    monkeypatch.setattr(ql, "_MAX_BLOCK_B", 32)
    monkeypatch.setattr(ql, "_GPU_TILE_PREFS", {k: ((64, 2, 4),) for k in ("16bit", "tf32", "ieee")})
    monkeypatch.setattr(ql, "_CPU_PROGRAMS", 2)
    monkeypatch.setattr(ql, "_COMBINE_BLOCK_P", 2)  # several partial chunks in the combine kernel
    b, d, length = 70, 32, 300
    cfg = ql._launch_settings(b, length, d, torch.float32, device)
    assert cfg.n_row_blocks == 3 and cfg.block_l == 64 and b > cfg.block_l
    if device.type == "cpu":
        assert cfg.tiles_per_prog == 3 and cfg.n_programs == 3
    mod, feats = reference_case(b, d, length, 0.1, device)
    ref = run_reference(mod, feats, 0.35)
    ours = run_ours(mod, feats, 0.35, precision="ieee", backend="triton")
    for a, r in zip(ours, ref):
        assert_close(a, r)


@pytest.mark.parametrize("length,diag_weight", [(0, 0.0), (37, 0.0), (37, 0.7)])
def test_stream_grads_match_fp64_autograd(length, diag_weight, device):
    """Loss, dq and dtau of QueueStreamLoss against float64 autograd (an empty queue leaves only the keys;
    diag_weight folds - w * mean_i S_ii into the kernels)."""
    b, d = 4, 48  # d not a power of two: BLOCK_D = 64 with masked lanes
    q = unit(b, d, device=device).requires_grad_(True)
    qm, keys_m = unit(b, d, device=device), unit(b, d, device=device)
    queue = unit(length, d, device=device).t().contiguous()
    tau = torch.tensor(0.05, device=device, requires_grad=True)
    alpha = 0.6
    loss = QueueStreamLoss.apply(q, qm, keys_m, queue, tau, alpha, "ieee", diag_weight)
    (3.0 * loss).backward()
    q64 = q.detach().double().requires_grad_(True)
    tau64 = tau.detach().double().requires_grad_(True)
    ref = stream_fp64(q64, qm, keys_m, queue, tau64, alpha)
    ref = ref - diag_weight * (q64 * keys_m.double()).sum(1).mean() / tau64
    (3.0 * ref).backward()
    assert_close(loss, ref.detach(), "loss")
    assert_close(q.grad, q64.grad, "dq")
    assert_close(tau.grad, tau64.grad, "dtau")
    assert tau.grad.shape == tau.shape


def test_only_q_needs_grad(device):
    b, d = 3, 32
    q = unit(b, d, device=device).requires_grad_(True)
    tau = torch.tensor(0.07, device=device)  # no grad wanted
    queue = unit(70, d, device=device).t().contiguous()
    loss = QueueStreamLoss.apply(q, unit(b, d, device=device), unit(b, d, device=device), queue, tau, 0.4, "ieee")
    loss.backward()
    assert q.grad is not None and tau.grad is None and torch.isfinite(q.grad).all()


def test_queue_may_change_before_backward_and_no_grad_skips_the_gradient_pass(monkeypatch, device):
    """The training forward enqueues into the queue in place between the loss and backward: the gradients
    must be those of the queue the loss saw. Under no_grad the gradient pass is not run at all."""
    import kernels.queue_loss as ql

    mod, feats = reference_case(4, 32, 64, 0.07, device)
    ref = run_reference(mod, feats, 0.4)
    gv, gt, gv_m, gt_m = (f.clone().requires_grad_(i < 2) for i, f in enumerate(feats))
    tau = mod.temp.detach().clone().requires_grad_(True)
    txt_queue, vid_queue = mod.txt_queue.clone(), mod.vid_queue.clone()
    loss = distill_align_loss(gv, gt, gv_m, gt_m, txt_queue, vid_queue, tau, 0.4, precision="ieee", backend="triton")
    txt_queue[:, :4] = gt_m.detach().t()  # what DistillAlign.enqueue does
    vid_queue[:, :4] = gv_m.detach().t()
    loss.backward()
    for name, a, r in zip(("loss_align", "d gv", "d gt", "d temp"), (loss.detach(), gv.grad, gt.grad, tau.grad), ref):
        assert_close(a, r, name)
    calls = []
    monkeypatch.setattr(ql, "_stream_backward", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        again = distill_align_loss(gv, gt, gv_m, gt_m, mod.txt_queue, mod.vid_queue, tau, 0.4, precision="ieee",
                                   backend="triton")
    assert not calls
    assert_close(again, ref[0], "loss_align (no_grad)")


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else []))
def test_half_precision_stream_loss(dtype, device):
    """fp16 (and bf16 on GPU; the interpreter computes bf16 wrong) against fp64 at 1e-2."""
    b, d, length = 5, 64, 200
    q = unit(b, d, device=device, dtype=dtype).requires_grad_(True)
    qm, keys_m = unit(b, d, device=device, dtype=dtype), unit(b, d, device=device, dtype=dtype)
    queue = unit(length, d, device=device, dtype=dtype).t().contiguous()
    tau = torch.tensor(0.1, device=device, requires_grad=True)
    loss = QueueStreamLoss.apply(q, qm, keys_m, queue, tau, 0.3, "auto")
    loss.backward()
    assert q.grad.dtype == dtype and loss.dtype == torch.float32
    q64 = q.detach().double().requires_grad_(True)
    tau64 = tau.detach().double().requires_grad_(True)
    ref = stream_fp64(q64, qm, keys_m, queue, tau64, 0.3)
    ref.backward()
    assert rel_err(loss, ref) < 1e-2
    assert rel_err(q.grad, q64.grad) < 1e-2
    assert rel_err(tau.grad, tau64.grad) < 1e-2


@pytest.mark.parametrize("normalize", [True, False])
def test_queue_similarity_fp32(normalize, device):
    b, d, n = 5, 48, 150
    q = torch.randn(b, d, device=device) * 3.0
    q[2] = 0.0  # F.normalize's eps: a zero row stays 0
    bank = unit(n, d, device=device).t().contiguous()
    tau = torch.tensor(0.07, device=device)
    out = torch.full((b, n), float("nan"), device=device)
    res = queue_similarity(q, bank, tau, normalize=normalize, precision="ieee", out=out, backend="triton")
    assert res.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    qn = F.normalize(q.double(), dim=-1) if normalize else q.double()
    assert_close(out, qn @ bank.double() / 0.07)
    assert_close(queue_similarity(q, bank, tau, normalize=normalize, backend="torch"), out)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else []))
def test_queue_similarity_half(dtype, device):
    b, d, n = 3, 32, 100
    q = torch.randn(b, d, device=device).to(dtype)
    bank = unit(n, d, device=device, dtype=dtype).t().contiguous()
    tau = torch.tensor(0.3, device=device)
    out = torch.full((b, n), float("nan"), device=device, dtype=dtype)
    queue_similarity(q, bank, tau, out=out, backend="triton")
    assert out.dtype == dtype and not torch.isnan(out).any()
    ref = F.normalize(q.double(), dim=-1) @ bank.double() / 0.3
    assert rel_err(out, ref) < 1e-2


def test_torch_backend_matches_reference(device):
    mod, feats = reference_case(3, 32, 64, 0.07, device)
    ref = run_reference(mod, feats, 0.4)
    ours = run_ours(mod, feats, 0.4, backend="torch")
    for a, r in zip(ours, ref):
        assert_close(a, r)
    gv, gt, gv_m, gt_m = feats
    assert_close(distill_align_loss_torch(gv, gt, gv_m, gt_m, mod.txt_queue, mod.vid_queue, mod.temp, 0.4), ref[0])


def test_bad_inputs(device):
    b, d, length = 3, 32, 40
    q, qm, k = (unit(b, d, device=device) for _ in range(3))
    queue = unit(length, d, device=device).t().contiguous()
    tau = torch.tensor(0.07, device=device)
    with pytest.raises(KernelInputError, match=r"queue must be contiguous.*\(32, 40\)"):
        QueueStreamLoss.apply(q, qm, k, unit(length, d, device=device).t(), tau, 0.4, "ieee")
    with pytest.raises(KernelInputError, match=r"q \(shape \(3, 40\)\).*multiple of 16"):
        QueueStreamLoss.apply(unit(b, 40, device=device), unit(b, 40, device=device), unit(b, 40, device=device),
                              unit(length, 40, device=device).t().contiguous(), tau, 0.4, "ieee")
    with pytest.raises(KernelInputError, match=r"queue dtype .*float16.* does not match q"):
        QueueStreamLoss.apply(q, qm, k, queue.half(), tau, 0.4, "ieee")
    with pytest.raises(KernelInputError, match=r"keys_m shape \(2, 32\)"):
        QueueStreamLoss.apply(q, qm, k[:2], queue, tau, 0.4, "ieee")
    with pytest.raises(KernelInputError, match=r"tau must be a one-element"):
        QueueStreamLoss.apply(q, qm, k, queue, torch.ones(2, device=device), 0.4, "ieee")
    with pytest.raises(KernelInputError, match=r"txt_queue must be contiguous"):
        distill_align_loss(q, qm, k, k, unit(length, d, device=device).t(), queue, tau, 0.4, backend="triton")
    with pytest.raises(KernelInputError, match=r"bank dtype"):
        queue_similarity(q, queue.half(), tau, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_no_host_sync():
    mod, feats = reference_case(8, 64, 1000, 0.07, torch.device("cuda"))
    gv, gt, gv_m, gt_m = [f.clone().requires_grad_(True) for f in feats]
    tau = mod.temp.detach().clone().requires_grad_(True)
    distill_align_loss(gv, gt, gv_m, gt_m, mod.txt_queue, mod.vid_queue, tau, 0.4)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = distill_align_loss(gv, gt, gv_m, gt_m, mod.txt_queue, mod.vid_queue, tau, 0.4)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
