"""kernels/onednn.py: GEMMs with oneDNN-prepacked weights on the CPU — the same numbers as the plain
GEMMs (to half-precision rounding; fp32 to fp32 rounding), used where they apply and never where they do not
(small fp32 weights, grad, a weight written in place or replaced)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_bn_stats_, random_batch, rel
from engine.fused import FusedLDDETR
from kernels import onednn
from reference import LDDETR

pytestmark = pytest.mark.skipif(not onednn.packing_enabled(), reason="this torch build has no oneDNN bf16 GEMMs")


@pytest.fixture(autouse=True)
def _packing_on():
    onednn.set_packing(True)
    yield
    onednn.set_packing(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_match_plain_gemms(fresh_seed, dtype):
    if not onednn.packing_enabled(dtype):
        pytest.skip(f"oneDNN has no fast {dtype} GEMMs on this CPU (fp16: AVX512-FP16 / AMX-FP16)")
    x = torch.randn(3, 7, 40).to(dtype)
    w, b = torch.randn(24, 40).to(dtype), torch.randn(24).to(dtype)
    other = torch.randn(7, 24).to(dtype).expand(3, 7, 24)  # a broadcast residual, as the decoder's constants
    with torch.no_grad():
        plain = F.linear(x.float(), w.float(), b.float())
        assert rel(onednn.linear(x, w, b), plain) < 1e-2
        assert rel(onednn.linear(x, w, b, relu=True), plain.relu()) < 1e-2
        assert rel(onednn.linear_add(other, x, w), other.float() + F.linear(x.float(), w.float())) < 1e-2
        wt = w.t().contiguous()  # stored as W^T, as the conv blocks' weights
        x2 = x.reshape(21, 40)
        assert rel(onednn.addmm_t(b, x2, wt, relu=True), plain.reshape(21, 24).relu()) < 1e-2
        assert rel(onednn.linear_add(other.reshape(21, 24), x2, wt, transposed=True),
                   other.reshape(21, 24).float() + x2.float() @ wt.float()) < 1e-2
    assert len(onednn.packed_ids()) == 2  # w, and wt transposed: packed once each


def test_fp32_packs_only_large_weights_and_matches_ieee_gemms(fresh_seed):
    """fp32 weights above FP32_MIN_PACKED elements take oneDNN (IEEE fp32: the plain GEMM's numbers to fp32
    rounding, against float64), smaller ones MKL's addmm."""
    k, n = 256, onednn.FP32_MIN_PACKED // 256 + 3
    x, w, b = torch.randn(3, 11, k), torch.randn(n, k), torch.randn(n)
    other = torch.randn(3, 11, n)
    exact = F.linear(x.double(), w.double(), b.double())
    with torch.no_grad():
        y = onednn.linear(x, w, b)
        y_add = onednn.linear_add(other, x, w, bias=b)
        a = torch.empty(1).uniform_(0.1, 0.9)  # a one-parameter PReLU: oneDNN's leaky_relu epilogue
        a_n = torch.empty(n).uniform_(0.1, 0.9)  # per-channel: the plain F.prelu after the packed GEMM
        y_prelu, y_prelu_n = onednn.linear(x, w, b, prelu=a), onednn.linear(x.reshape(33, k), w, b, prelu=a_n)
        assert len(onednn.packed_ids()) == 1
        assert rel(y_prelu, F.prelu(exact, a.double())) < 1e-6
        assert rel(y_prelu_n, F.prelu(exact.reshape(33, n), a_n.double())) < 1e-6
        assert rel(y, exact) < 1e-6 and rel(F.linear(x, w, b), exact) < 1e-6
        assert rel(y_add, other.double() + exact) < 1e-6
        small = torch.randn(16, k)
        onednn.linear(x, small)
    assert len(onednn.packed_ids()) == 1  # the small weight took the plain path


def test_repacks_after_an_in_place_write_and_never_packs_small_fp32_or_grad(fresh_seed):
    x, w = torch.randn(5, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    with torch.no_grad():
        first = onednn.linear(x, w)
        w.mul_(2)  # e.g. load_state_dict into the fused model
        assert rel(onednn.linear(x, w), 2 * first.float()) < 1e-2  # the stale pack is not used
        onednn.set_packing(True)  # forgets the packs
        onednn.linear(x.float(), w.float())
    assert not onednn.packed_ids()  # a small fp32 weight takes the plain path
    wg = w.float().bfloat16().requires_grad_()
    y = onednn.linear(x, wg)  # grad mode with a weight that requires grad: plain F.linear (differentiable)
    assert y.requires_grad and not onednn.packed_ids()


def test_fused_bf16_packed_as_accurate_as_plain(fresh_seed, small_cfg):
    """The whole fused model in bf16: with packing the outputs are as close to the fp32 model as the
    plain-GEMM bf16 outputs are (within 2x, and bf16 tolerance always allowed), and the packed path really
    ran (weights in the cache). The bf16 saliency is ill-conditioned on some random weights (the plain bf16
    run itself ~5 % from fp32), so the bound follows the plain run's own error rather than a fixed number.
    Saliency follows the top-1 moment, whose choice random weights leave within bf16 rounding: every run
    uses the fp32 run's top-1 slice."""
    model = randomize_bn_stats_(LDDETR(small_cfg).eval())
    exact = FusedLDDETR.from_reference(model)
    fused = FusedLDDETR.from_reference(model).to_dtype(torch.bfloat16)
    batch = random_batch(small_cfg, [75, 40, 9], [9, 5, 3])
    bounds = []
    real = exact.hd_head.slice_bounds
    exact.hd_head.slice_bounds = fused.hd_head.slice_bounds = (
        lambda *a: bounds[0] if bounds else bounds.append(real(*a)) or bounds[0])
    with torch.inference_mode():
        onednn.set_packing(False)
        ref = exact(*batch)
        plain = fused(*batch)
        assert not onednn.packed_ids()
        onednn.set_packing(True)
        packed = fused(*batch)
    assert len(onednn.packed_ids()) > 20
    keep = batch[1]
    for key, tol in [("pred_spans", 1e-2), ("pred_logits", 2e-2), ("saliency_scores", 2e-2)]:
        pick = (lambda t: t.float()[keep]) if key == "saliency_scores" else (lambda t: t.float())
        own, err = rel(pick(plain[key]), pick(ref[key])), rel(pick(packed[key]), pick(ref[key]))
        assert err <= max(tol, 2 * own), f"{key}: packed bf16 {err:.3f} from fp32, plain bf16 {own:.3f}"


def test_built_under_inference_mode_still_packs(fresh_seed, small_cfg):
    """A fused model built (and cast) inside ``torch.inference_mode`` holds normal tensors, so its GEMMs are
    packed (an inference tensor has no version counter: packing one would raise, or miss an in-place write),
    and a weight that is an inference tensor takes the plain path."""
    model = randomize_bn_stats_(LDDETR(small_cfg).eval())
    batch = random_batch(small_cfg, [75, 40], [9, 5])
    with torch.inference_mode():
        fused = FusedLDDETR.from_reference(model).to_dtype(torch.bfloat16)
        out = fused(*batch)
        assert len(onednn.packed_ids()) > 20
        x, w = torch.randn(5, 16).bfloat16(), torch.randn(8, 16).bfloat16()  # inference tensors
        before = len(onednn.packed_ids())
        assert rel(onednn.linear(x, w), F.linear(x.float(), w.float())) < 1e-2 and len(onednn.packed_ids()) == before
    assert not any(b.is_inference() for b in fused.buffers())
    with torch.no_grad():
        again = FusedLDDETR.from_reference(model).to_dtype(torch.bfloat16)(*batch)
    assert torch.equal(out["pred_spans"], again["pred_spans"])


def test_fused_fp32_runs_packed_gemms_for_large_weights(fresh_seed, small_cfg):
    """The fp32 fused model packs its weights above FP32_MIN_PACKED (the attention/FFN and conv GEMMs), smaller
    ones only for GEMMs of FP32_MIN_PACKED_WORK multiply-adds, and never a thin one (the decoder's 2-wide box
    heads stay on MKL)."""
    model = randomize_bn_stats_(LDDETR(small_cfg).eval())
    fused = FusedLDDETR.from_reference(model)
    with torch.inference_mode():
        fused(*random_batch(small_cfg, [75, 40], [9, 5]))
    packed_ids = {key[0] for key in onednn.packed_ids()}
    weights = [b for b in fused.buffers() if b.dim() == 2 and b.dtype == torch.float32]
    large = {id(w) for w in weights if w.numel() > onednn.FP32_MIN_PACKED}
    assert not packed_ids & {id(w) for w in weights if w.numel() <= onednn.FP32_MIN_PACKED and min(w.shape) < 64}
    assert len(packed_ids & large) >= 10
    x = torch.randn(1, 32, 256)  # the rule itself: 256 x 256 packs from 32 rows, a 2 x 256 head never
    assert onednn._fp32_pays(x, torch.empty(256, 256)) and not onednn._fp32_pays(x[:, :31], torch.empty(256, 256))
    assert not onednn._fp32_pays(torch.randn(9000, 256), torch.empty(2, 256))
    assert onednn._fp32_pays(x[:, :1], torch.empty(257, 256))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv3_matches_conv1d(fresh_seed, dtype):
    """onednn.conv3: relu(conv1d(x, W, b, padding=1) (+ residual)) over (B, L, C) activations at odd sizes
    (L = 1, 2, 37) against float64 conv1d; small fp32 weights and the one-clip residual form (torch 2.11's oneDNN
    fails there) return None (the GEMM path)."""
    c_in, c_out = 160, 152  # 3 * 160 * 152 > FP32_MIN_PACKED
    w = torch.randn(c_out, c_in, 3, dtype=torch.float64) / (3 * c_in) ** 0.5
    b = torch.randn(c_out, dtype=torch.float64)
    wt = w.permute(2, 1, 0).reshape(3 * c_in, c_out)  # the fused conv blocks' (3 C_in, C_out) layout
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for bsz, length in [(1, 37), (3, 2), (2, 1)]:
        x, r = torch.randn(bsz, length, c_in, dtype=torch.float64), torch.randn(bsz, length, c_out, dtype=torch.float64)
        conv = F.conv1d(x.transpose(1, 2), w, b, padding=1).transpose(1, 2)
        with torch.no_grad():
            y = onednn.conv3(x.to(dtype), wt.to(dtype), b.to(dtype))
            y_res = onednn.conv3(x.to(dtype), wt.to(dtype), b.to(dtype), residual=r.to(dtype))
        assert y.shape == (bsz, length, c_out) and y.is_contiguous() and y.dtype == dtype
        assert rel(y, conv.relu()) < tol
        if length == 1:
            assert y_res is None
        else:
            assert rel(y_res, (conv + r).relu()) < tol
    with torch.no_grad():
        small = torch.randn(3 * 16, 16)
        assert onednn.conv3(torch.randn(1, 5, 16), small, torch.randn(16)) is None


def test_half_softmax_via_fp32_matches_float64_attention(fresh_seed):
    """The bf16 attention's long-row softmax (>= 65536 scores, 75 keys: the fp32 route) against float64, with
    padded keys masked: within bf16's error, and masked keys get exactly zero weight."""
    from engine.fused.common import attention, attention_mask, heads

    b, h, l = 32, 8, 75
    qkv = torch.randn(b, l, 768, dtype=torch.float64)
    keep = torch.ones(b, l, dtype=torch.bool)
    keep[1::2, 40:] = False
    q, k, v = (heads(t, h) for t in qkv.split(256, -1))
    s = (q @ k.transpose(-1, -2)) * 32 ** -0.5 + torch.where(keep[:, None, None, :], 0.0, float("-inf"))
    ref = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, l, 256)
    qb, kb, vb = (heads(t, h) for t in qkv.bfloat16().split(256, -1))
    vb_noisy = vb.clone()
    vb_noisy[1::2, :, 40:] = 1e4  # padded values: must not leak
    with torch.no_grad():
        y = attention(qb, kb, vb_noisy, attention_mask(keep, h, torch.bfloat16), 32 ** -0.5)
    assert rel(y.double(), ref) < 1e-2


@pytest.mark.parametrize("lq,lk,e", [(10, 75, 64), (75, 75, 32), (10, 10, 32)])
def test_small_half_attention_runs_in_fp32(fresh_seed, monkeypatch, lq, lk, e):
    """bf16 attention over few (batch x head) matrices (B = 1, 8 heads) takes the fp32 route: its result is the
    fp32 attention rounded once (bit-equal), within bf16's error of float64 with padded keys masked and
    noisy; one more matrix than the limit keeps the bf16 path."""
    from engine.fused import common
    from engine.fused.common import attention, attention_mask

    h = 8
    q = torch.randn(1, h, lq, e, dtype=torch.float64)
    k = torch.randn(1, h, lk, e, dtype=torch.float64)
    v = torch.randn(1, h, lk, 32, dtype=torch.float64)
    keep = torch.ones(1, lk, dtype=torch.bool)
    keep[0, lk - lk // 3:] = False
    s = (q @ k.transpose(-1, -2)) * e ** -0.5 + torch.where(keep[:, None, None, :], 0.0, float("-inf"))
    ref = (s.softmax(-1) @ v).transpose(1, 2).reshape(1, lq, h * 32)
    v_noisy = v.clone()
    v_noisy[0, :, ~keep[0]] = 1e4
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v_noisy.bfloat16()
    with torch.no_grad():
        y = attention(qb, kb, vb, attention_mask(keep, h, torch.bfloat16), e ** -0.5)
        y32 = attention(qb.float(), kb.float(), vb.float(), attention_mask(keep, h, torch.float32), e ** -0.5)
        monkeypatch.setattr(common, "HALF_ATTENTION_FP32_MAX_BATCH", h - 1)
        y_half = attention(qb, kb, vb, attention_mask(keep, h, torch.bfloat16), e ** -0.5)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y32.bfloat16())
    assert rel(y.double(), ref) < 1e-2 and rel(y_half.double(), ref) < 2e-2
    assert not torch.equal(y_half, y)  # the limit is what picks the route
