"""Fused conv-BN-ReLU residual block (kernels/conv_block.py) against the reference ConvolutionalBlocks.

On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1 before triton is
imported); on a CUDA machine the same tests compile them for the GPU. Inputs are fresh random each run
(the ``fresh_seed`` fixture prints the seed), with noise in the padding and outputs poisoned with NaN.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import KernelInputError  # noqa: E402
from kernels.conv_block import fold_block, residual_block, residual_block_stack, residual_block_torch  # noqa: E402
from reference.conv_blocks import ConvolutionalBlocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("strict_fp32")  # conftest: the torch reference in true fp32 on GPUs


def make_blocks(d: int, n: int = 2) -> ConvolutionalBlocks:
    """Reference blocks in eval mode with non-trivial BN statistics and affine parameters."""
    m = ConvolutionalBlocks(d, n)
    with torch.no_grad():
        for blk in m.blocks:
            for bn in (blk.bn1, blk.bn2):
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_(1.0, 0.3)
                bn.bias.normal_(0, 0.3)
    return m.eval().to(DEVICE)


def make_input(d: int, t: int, b: int, padded: bool, dtype=torch.float32):
    x = torch.randn(t, b, d, device=DEVICE, dtype=dtype)  # padded clips keep their noise: any leak shows
    lengths = torch.randint(max(1, t // 2), t + 1, (b,), device=DEVICE) if padded else torch.full((b,), t, device=DEVICE)
    if padded:
        lengths[0] = max(1, t - 3)
    mask = torch.arange(t, device=DEVICE)[None] < lengths[:, None]  # (B, T)
    return x, mask


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def reference_fp64(m: ConvolutionalBlocks, x, mask):
    m64 = make_copy(m).double()
    with torch.no_grad():
        return m64(x.double(), mask)


def make_copy(m):
    import copy

    return copy.deepcopy(m)


# (d, T, B, padded): T not a multiple of the 30-clip tile, B = 1 and 3, d not a power of two
SHAPES = [(32, 37, 3, True), (48, 23, 1, False), (64, 75, 1, True), (32, 5, 3, True), (16, 61, 2, True)]


@pytest.mark.parametrize("d,t,b,padded", SHAPES)
def test_block_fp32_matches_reference(fresh_seed, d, t, b, padded):
    m = make_blocks(d)
    x, mask = make_input(d, t, b, padded)
    with torch.no_grad():
        ref = m(x, mask)
        y = x
        for blk in m.blocks:
            out = torch.full_like(x, float("nan"))  # poison: every element must be written
            y = residual_block(y, mask, fold_block(blk), precision="ieee", out=out)
    assert not y.isnan().any()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert rel_err(y, reference_fp64(m, x, mask)) < 1e-5


@pytest.mark.parametrize("d,t,b,padded", SHAPES[:2])
def test_batch_first_layout(fresh_seed, d, t, b, padded):
    m = make_blocks(d)
    x, mask = make_input(d, t, b, padded)
    with torch.no_grad():
        ref = m(x, mask)
        y = residual_block_stack(x.transpose(0, 1).contiguous(), mask, [fold_block(blk) for blk in m.blocks],
                                 seq_first=False, precision="ieee")
    torch.testing.assert_close(y.transpose(0, 1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_block_half_precision(fresh_seed, dtype):
    """fp16 (and bf16 on GPU: the interpreter computes bf16 wrong) against an fp64 reference."""
    d, t, b = 32, 37, 3
    m = make_blocks(d, 3)
    x, mask = make_input(d, t, b, True)
    with torch.no_grad():
        y = residual_block_stack(x.to(dtype), mask, [fold_block(blk, dtype) for blk in m.blocks])
    assert y.dtype == dtype and not y.isnan().any()
    assert rel_err(y, reference_fp64(m, x, mask)) < 1e-2


@pytest.mark.skipif(DEVICE != "cuda", reason="tf32 only exists on the GPU (the interpreter computes fp32 exactly)")
def test_block_tf32():
    d, t, b = 256, 75, 4
    m = make_blocks(d, 5)
    x, mask = make_input(d, t, b, True)
    with torch.no_grad():
        y = residual_block_stack(x, mask, [fold_block(blk) for blk in m.blocks], precision="tf32")
    assert rel_err(y, reference_fp64(m, x, mask)) < 5e-4


def test_padding_invariance(fresh_seed):
    """A padded sample's valid clips equal the same sample run alone, unpadded."""
    d, t = 32, 29
    m = make_blocks(d)
    x, mask = make_input(d, t, 3, True)
    n = int(mask[0].sum())
    with torch.no_grad():
        fbs = [fold_block(blk) for blk in m.blocks]
        full = residual_block_stack(x, mask, fbs, precision="ieee")
        alone = residual_block_stack(x[:n, :1].contiguous(), mask[:1, :n].contiguous(), fbs, precision="ieee")
    torch.testing.assert_close(full[:n, :1], alone, rtol=1e-5, atol=1e-5)


def test_torch_folded_path_matches_reference(fresh_seed):
    m = make_blocks(48)
    x, mask = make_input(48, 23, 3, True)
    with torch.no_grad():
        ref = m(x, mask)
        y = x
        for blk in m.blocks:
            y = residual_block_torch(y, mask, fold_block(blk))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_apply_swaps_in_place_and_matches(fresh_seed):
    m = make_blocks(32, 3)
    ref_state = {k: v.clone() for k, v in m.state_dict().items()}
    x, mask = make_input(32, 37, 3, True)
    with torch.no_grad():
        ref = m(x, mask)
    kernels.apply(m, "triton", precision="ieee")
    assert type(m).__name__ == "TritonConvolutionalBlocks"
    assert m.state_dict().keys() == ref_state.keys()
    with torch.no_grad():
        y = m(x, mask)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # the folded weights follow later changes to the BN statistics (cache keyed on tensor versions)
    with torch.no_grad():
        m.blocks[1].bn2.running_mean.add_(0.25)
        kernels.apply(m, "torch")
        ref2 = m(x, mask)
        kernels.apply(m, "triton", precision="ieee")
        y2 = m(x, mask)
    assert (ref2 - ref).abs().max() > 1e-3
    torch.testing.assert_close(y2, ref2, rtol=1e-5, atol=1e-5)


def test_training_mode_uses_torch_autograd(fresh_seed):
    """Train mode (BN batch statistics) and eval-with-grad run the reference ops: same outputs and grads."""
    d = 32
    ref, swapped = make_blocks(d), make_blocks(d)
    swapped.load_state_dict(ref.state_dict())
    kernels.apply(swapped, "triton")
    x, mask = make_input(d, 19, 3, True)
    for train in (True, False):
        ref.train(train), swapped.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ga = torch.randn_like(x)
        (ref(xa, mask) * ga).sum().backward()
        (swapped(xb, mask) * ga).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad)
        for (name, pa), pb in zip(ref.named_parameters(), swapped.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, msg=name)
            pa.grad = pb.grad = None


def test_bad_inputs_raise_clear_errors():
    m = make_blocks(32)
    fbs = [fold_block(blk) for blk in m.blocks]
    x, mask = make_input(32, 9, 2, True)
    with pytest.raises(KernelInputError, match="contiguous"):
        residual_block(x.transpose(0, 1), mask, fbs[0])
    with pytest.raises(KernelInputError, match="dtype"):
        residual_block(x.double(), mask, fbs[0])
    with pytest.raises(KernelInputError, match="mask shape"):
        residual_block(x, mask[:, :5].contiguous(), fbs[0])
    with pytest.raises(KernelInputError, match="folded weights"):
        residual_block(x.half(), mask, fbs[0])
    m40 = make_blocks(40)
    x40, mask40 = make_input(40, 9, 2, True)
    with pytest.raises(KernelInputError, match="multiple of 16"):
        residual_block(x40, mask40, fold_block(m40.blocks[0]))


def test_backend_resolution(monkeypatch):
    from kernels import resolve_backend

    cpu = torch.device("cpu")
    monkeypatch.delenv("LDDETR_KERNELS", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("LDDETR_KERNELS", "triton")
    assert resolve_backend("auto", cpu) == "triton"
    monkeypatch.setenv("LDDETR_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LDDETR_KERNELS"):
        resolve_backend("auto", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelInputError, match="TRITON_INTERPRET"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend"):
        kernels.apply(make_blocks(16), "cuda")
