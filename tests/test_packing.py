"""Padding removal (engine/fused/packing.py): which clips are computed, the layout maps, and the fused model on
packed clips against the reference and against its own padded layout — heavy padding, a mask with holes, a
sample with no valid clip, one video with several queries, bf16."""

from __future__ import annotations

import pytest
import torch

from conftest import compare, compare_to_reference, randomize_bn_stats_, random_batch, rel
from engine.fused import FusedLDDETR
from engine.fused.packing import MIN_SKIPPED, Packing, set_row_packing
from reference import LDDETR, LDDETRConfig


@pytest.fixture
def spy(monkeypatch):
    """Records the row count of every layout the fused model packs to (None: it ran padded)."""
    seen = []
    real = Packing.of.__func__

    def of(cls, vkeep, lengths=None, force=False):
        p = real(cls, vkeep, lengths, force)
        seen.append(None if p is None else p.count)
        return p

    monkeypatch.setattr(Packing, "of", classmethod(of))
    return seen


def padded_run(fused, batch):
    set_row_packing(False)
    try:
        with torch.no_grad():
            return fused(*batch)
    finally:
        set_row_packing(True)


def _models(cfg):
    model = randomize_bn_stats_(LDDETR(cfg).eval())
    return model, FusedLDDETR.from_reference(model)


def test_computed_clips_and_maps(fresh_seed):
    """Computed = valid, or before the sample's length, or every clip of an empty sample; pack/unpack round
    trip; unpacked positions not computed hold finite values; neighbours point at the packed rows of valid
    clips (t - 1, t, t + 1) and at the zero row otherwise, and the shifted rows are the zero-padded conv input."""
    vkeep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]).bool()
    comp = Packing.computed(vkeep)
    expect = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    assert torch.equal(comp, expect)  # sample 2: 3 valid clips, clip 1 (a hole before the length) computed
    p = Packing.of(vkeep)
    assert p is not None and p.count == int(expect.sum())
    x = torch.randn(4, 6, 5)
    xp = p.pack(x)
    assert xp.shape == (1, p.count, 5) and torch.equal(xp[0], x[expect])
    back = p.unpack(xp)
    assert torch.equal(back[expect], x[expect]) and torch.isfinite(back).all()
    nbr = p.neighbours()
    flat = expect.reshape(-1).nonzero().squeeze(1)
    for r, pos in enumerate(flat.tolist()):
        b, t = divmod(pos, 6)
        for k, want in zip((-1, 0, 1), nbr[r].tolist()):
            ok = 0 <= t + k < 6 and bool(vkeep[b, t + k])
            assert want == (int((flat == pos + k).nonzero()) if ok else p.count), (b, t, k)
    y = torch.randn(p.count, 5)
    pad = torch.zeros(4, 8, 5)
    pad[:, 1:7][expect] = y
    pad[:, 1:7][~vkeep] = 0  # the reference zeroes invalid clips before a conv
    want = torch.cat([pad[:, :-2], pad[:, 1:-1], pad[:, 2:]], 2)[expect]
    assert torch.equal(p.shifted(y), want)
    assert torch.equal(p.per_row(torch.arange(4.0)[:, None])[0, :, 0], flat.div(6, rounding_mode="floor").float())


def test_when_it_packs(fresh_seed):
    """Nothing padded, or less than MIN_SKIPPED of the clips to skip: the padded layout (None); CUDA tensors and
    set_row_packing(False) too."""
    full = torch.ones(3, 40, dtype=torch.bool)
    assert Packing.of(full) is None and Packing.of(full, force=True).count == 120
    few = full.clone()
    few[1, 40 - int(MIN_SKIPPED * 120) + 1:] = False  # just under the threshold skipped
    assert Packing.of(few) is None
    many = full.clone()
    many[1, 20:] = False
    assert Packing.of(many).count == 100
    set_row_packing(False)
    try:
        assert Packing.of(many) is None
    finally:
        set_row_packing(True)


@pytest.mark.parametrize("case", ["prefix", "holes", "empty"])
def test_packed_matches_padded_and_reference(strict_fp32, fresh_seed, small_cfg, spy, case):
    """Heavy padding (half the clips or more): the fused model packs, and every output at valid clips equals
    its own padded run (1e-5) — also for a mask with holes and a sample with no valid clip — and, for
    valid-first masks, the reference."""
    model, fused = _models(small_cfg)
    batch = random_batch(small_cfg, [75, 30, 9, 41, 2], [9, 5, 12, 3, 7])
    video, vkeep, text, tkeep = batch
    if case != "prefix":
        vkeep = vkeep.clone()
        if case == "holes":
            vkeep[1, 4:9] = False
            vkeep[3, 0] = False
        else:
            vkeep[3] = False
        batch = (video, vkeep, text, tkeep)
    with torch.no_grad():
        out = fused(*batch)
    assert spy and spy[-1] is not None and spy[-1] < 0.6 * vkeep.numel(), spy
    compare(padded_run(fused, batch), out, vkeep, 1e-5)
    if case == "prefix":
        with torch.no_grad():
            compare_to_reference(model, batch, model(*batch), out, 1e-5)


def test_packed_every_block_count(strict_fp32, fresh_seed, spy):
    """The packed layers with no T2V / encoder / conv layers and with several, use_txt_pos, an odd video length."""
    for over in (dict(num_v2t_encoder_layers=0, num_encoder1_layers=0, num_convolutional_blocks=0, num_encoder2_layers=0),
                 dict(num_convolutional_blocks=3, num_encoder1_layers=1, use_txt_pos=True, num_decoder_layers=3)):
        cfg = LDDETRConfig.preset("charades", v_feat_dim=21, t_feat_dim=17, queue_length=8, **over)
        model, fused = _models(cfg)
        batch = random_batch(cfg, [37, 3, 20, 1], [4, 13, 1, 6])
        with torch.no_grad():
            out = fused(*batch)
            compare_to_reference(model, batch, model(*batch), out, 1e-5)
        assert spy[-1] is not None


def test_packed_one_video_several_queries(strict_fp32, fresh_seed, small_cfg, spy):
    """A padded (1, T, Dv) video against B queries packs the expanded batch and answers as the repeated video."""
    model, fused = _models(small_cfg)
    video, vkeep, text, tkeep = random_batch(small_cfg, [30, 30, 30], [7, 5, 9])
    video = torch.cat([video, torch.randn(3, 45, small_cfg.v_feat_dim)], 1)[:1]  # 45 padded clips of noise
    vkeep = torch.cat([vkeep, torch.zeros(3, 45, dtype=torch.bool)], 1)[:1]
    with torch.no_grad():
        one = fused(video, vkeep, text, tkeep)
        rep = (video.expand(3, -1, -1), vkeep.expand(3, -1), text, tkeep)
        compare_to_reference(model, rep, model(*rep), one, 1e-5)
    assert spy[-1] == 90


def test_packed_bf16_close_to_padded(fresh_seed, small_cfg, spy):
    """Native bf16 on packed clips: as close to the fp32 reference as the bf16 padded layout is (x 2 + 2e-3,
    the rule the bf16 tests use; the two layouts round differently)."""
    model, fused = _models(small_cfg)
    fused.to_dtype(torch.bfloat16)
    batch = random_batch(small_cfg, [75, 31, 8, 50], [9, 5, 12, 3])
    with torch.no_grad():
        ref32 = model(*batch)
        out = fused(*batch)
    assert spy[-1] is not None
    pad = padded_run(fused, batch)
    for key in ("pred_logits", "pred_spans"):
        ours, theirs = rel(out[key].float(), ref32[key]), rel(pad[key].float(), ref32[key])
        assert ours <= 2 * theirs + 2e-3, f"{key}: packed bf16 error {ours:.2e} vs padded {theirs:.2e}"
