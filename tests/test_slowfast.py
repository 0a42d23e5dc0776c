"""SlowFast 8x8 R50 feature extractor: pytorchvideo parity (shared/data/slowfast_oracle), state-dict names,
HERO's clip/frame sampling, preprocessing, shapes for any frame count, determinism, bad weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.extract.slowfast_net import SlowFastConfig, SlowFastNet, init_random_
from tests.conftest import SHARED

ORACLE = SHARED / "data" / "slowfast_oracle"


@pytest.fixture(scope="module")
def oracle_state() -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(ORACLE / "weights_fp16.safetensors")).items()}


def _names(model: torch.nn.Module) -> set[str]:
    return {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}


def test_state_dict_names_and_shapes_are_pytorchvideos(oracle_state):
    model = SlowFastNet()
    assert _names(model) == set(oracle_state)
    ours = model.state_dict()
    bad = {k: (tuple(ours[k].shape), tuple(v.shape)) for k, v in oracle_state.items() if ours[k].shape != v.shape}
    assert not bad
    assert model.config.dim == 2304 and oracle_state["blocks.6.proj.weight"].shape == (400, 2304)


def test_oracle_parity(oracle_state):
    """pytorchvideo create_slowfast(model_depth=50), proj = Identity, eval, fp32 vs ours: <= 1e-4 relative."""
    model = SlowFastNet().eval()
    model.load_state_dict({**model.state_dict(), **oracle_state}, strict=True)
    io = np.load(ORACLE / "io.npz")
    with torch.no_grad():
        got = model(torch.from_numpy(io["slow"]).float(), torch.from_numpy(io["fast"]).float())
    want = torch.from_numpy(io["feature"]).float()
    assert got.shape == want.shape == (1, 2304)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, f"max |ours - pytorchvideo| / max |pytorchvideo| = {rel:.3e}"
    # the two halves really are slow (2048) then fast (256): a swapped order would not match
    assert not torch.allclose(got, torch.cat([got[:, 2048:], got[:, :2048]], 1))


@pytest.mark.parametrize("name", ["tiny", "tiny_deep"])
def test_test_presets_build_and_pool_globally(name):
    cfg = SlowFastConfig.from_name(name)
    model = init_random_(SlowFastNet(cfg)).eval()
    s = cfg.crop_size
    with torch.no_grad():
        out = model(torch.randn(2, 3, cfg.slow_frames, s, s), torch.randn(2, 3, cfg.fast_frames, s, s))
    assert out.shape == (2, cfg.dim) and cfg.dim < 2304 and torch.isfinite(out).all()


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: r50_8x8, tiny"):
        SlowFastConfig.from_name("r101")
