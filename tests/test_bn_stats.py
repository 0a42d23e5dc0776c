"""bn_stats="valid": BatchNorm statistics over valid clips only, so that extra padding never changes the math."""

import pytest
import torch

from reference import LDDETR, LDDETRConfig
from reference.conv_blocks import ConvolutionalBlocks, masked_batch_norm


def test_masked_bn_equals_batch_norm_without_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 7, generator=g, dtype=torch.float64)
    bn_a, bn_b = torch.nn.BatchNorm1d(8).double(), torch.nn.BatchNorm1d(8).double()
    with torch.no_grad():
        for bn in (bn_a, bn_b):
            bn.weight.copy_(torch.linspace(0.5, 2, 8))
            bn.bias.copy_(torch.linspace(-1, 1, 8))
    want = bn_a.train()(x)
    got = masked_batch_norm(x, torch.ones(3, 1, 7, dtype=torch.float64), bn_b.train())
    torch.testing.assert_close(got, want)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn_b, name), getattr(bn_a, name))


def test_valid_stats_ignore_bucket_padding():
    """A batch padded further (a fixed bucket) gives the same valid outputs and running statistics."""
    torch.manual_seed(0)
    blocks = ConvolutionalBlocks(16, 2, bn_stats="valid").double().train()
    lengths = torch.tensor([5, 9, 3])
    x = torch.randn(9, 3, 16, dtype=torch.float64)  # (L, B, d)
    mask = torch.arange(9)[None] < lengths[:, None]
    wide_x = torch.cat([x, torch.randn(7, 3, 16, dtype=torch.float64)])  # 7 more (noisy) padded clips
    wide_mask = torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], dim=1)
    state = {k: v.clone() for k, v in blocks.state_dict().items()}
    out = blocks(x, mask)
    stats = {k: v.clone() for k, v in blocks.state_dict().items()}
    blocks.load_state_dict(state)
    wide = blocks(wide_x, wide_mask)
    torch.testing.assert_close(wide[:9].transpose(0, 1)[mask], out.transpose(0, 1)[mask])
    for k, v in blocks.state_dict().items():
        torch.testing.assert_close(v, stats[k], msg=k)
    official = ConvolutionalBlocks(16, 2).double().train()  # "all": padding does change the statistics
    official.load_state_dict(state)
    a = official(x, mask)
    official.load_state_dict(state)
    b = official(wide_x, wide_mask)
    assert not torch.allclose(b[:9].transpose(0, 1)[mask], a.transpose(0, 1)[mask])


def test_config_option_and_state_dict_unchanged():
    assert LDDETRConfig().bn_stats == "all"
    with pytest.raises(ValueError, match="bn_stats"):
        LDDETRConfig(bn_stats="some")
    cfg = dict(v_feat_dim=10, t_feat_dim=6, queue_length=8)
    a, b = LDDETR(LDDETRConfig(**cfg)), LDDETR(LDDETRConfig(bn_stats="valid", **cfg))
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(blk.bn_stats == "valid" for blk in b.convolutional_fuser.convolutional_block.blocks)
