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


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small conv3d/BN ops on a shared 2-core runner: one OpenMP thread is ~50x faster than two contending."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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


# ------------------------------------------------------------------------------------- HERO's recipe

from engine.extract.slowfast import (  # noqa: E402
    SlowFastError, SlowFastExtractor, clip_frame_indices, normalize, resize_center_crop, scaled_size,
    slow_positions)

POS30 = list(range(0, 60, 2)) + [59, 59]  # clamp(linspace(0, 63, 32), 0, 59).long() by hand: 2i for i < 30


def test_clip_frame_indices_by_hand():
    assert clip_frame_indices(120).tolist() == [POS30, [60 + p for p in POS30]]
    # 61 frames: the last clip is frame 60 alone (padded to a second, then the second repeated)
    assert clip_frame_indices(61).tolist() == [POS30, [60] * 32]
    # 100 frames: second 3 = frames 90..99 then frame 99 repeated; clip 2 = seconds 2 and 3
    clip2 = [min(60 + p, 99) for p in POS30]
    assert clip_frame_indices(100).tolist()[1] == clip2
    # 25 frames (< 1 s): the padded second (0..24, 24 x 5) is tiled into a 2-s clip
    second = list(range(25)) + [24] * 5
    assert clip_frame_indices(25).tolist() == [[(second + second)[p] for p in POS30]]
    # a 25-fps source (HERO scales the window by floor(fps) / 30): linspace(0, 64 * 25 / 30 - 1, 32)
    want = [int(i * (64 * 25 / 30 - 1) / 31 + 1e-6) for i in range(32)]
    assert clip_frame_indices(60, source_fps=25.0).tolist() == [want]
    assert clip_frame_indices(60, source_fps=25.9).tolist() == [want]  # floor, as HERO's ffprobe fps


def test_slow_positions_by_hand():
    assert slow_positions(32, 4).tolist() == [0, 4, 8, 13, 17, 22, 26, 31]


def test_scaled_size_and_crop_offsets():
    assert scaled_size(480, 640, 224) == (224, 298)  # int(640 * 224 / 480) = int(298.67)
    assert scaled_size(1920, 1080, 224) == (398, 224)
    frames = torch.randint(0, 256, (2, 224, 300, 3), dtype=torch.uint8)  # already scaled: not resampled
    assert torch.equal(resize_center_crop(frames, 224), frames[:, :, 38:262])
    tall = torch.randint(0, 256, (1, 301, 224, 3), dtype=torch.uint8)
    assert torch.equal(resize_center_crop(tall, 224), tall[:, 38:262])  # int(77 / 2) = 38


def test_resize_keeps_flat_colour_and_symmetry():
    flat = torch.full((1, 480, 640, 3), 0, dtype=torch.uint8)
    flat[..., 0], flat[..., 1], flat[..., 2] = 200, 17, 93
    out = resize_center_crop(flat, 224)
    assert out.shape == (1, 224, 224, 3) and out.dtype == torch.uint8
    assert out[..., 0].unique().tolist() == [200] and out[..., 2].unique().tolist() == [93]
    ramp = torch.arange(640).div(640 / 256, rounding_mode="floor").to(torch.uint8).view(1, 1, 640, 1)
    ramp = ramp.expand(1, 480, 640, 3).contiguous()
    r = resize_center_crop(ramp, 224)[0, :, :, 0].int()
    assert (r.diff(dim=1) >= 0).all() and (r == r[:1]).all()  # still a horizontal ramp, rows equal


def test_resize_in_chunks_equals_one_pass():
    frames = torch.randint(0, 256, (20, 48, 64, 3), dtype=torch.uint8)
    assert torch.equal(resize_center_crop(frames, 32, chunk=3), resize_center_crop(frames, 32, chunk=100))


def test_normalize_by_hand():
    x = torch.tensor([0, 255, 115], dtype=torch.uint8).view(1, 1, 1, 1, 3).expand(1, 2, 1, 1, 3)
    y = normalize(x)
    assert y.shape == (1, 3, 2, 1, 1)
    want = torch.tensor([-0.45, 0.55, 115 / 255 - 0.45]) / (0.225 + 1e-8)
    torch.testing.assert_close(y[0, :, 0, 0, 0], want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- the extractor

@pytest.fixture(scope="module")
def tiny() -> SlowFastExtractor:
    return SlowFastExtractor(test_config="tiny", batch_size=2)


def _frames(n: int, h: int = 40, w: int = 52, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def test_interface(tiny):
    assert (tiny.name, tiny.fps, tiny.clip_seconds, tiny.frames_per_clip) == ("slowfast_r50_8x8", 30, 2.0, 60)
    assert tiny.dim == 288 and SlowFastConfig().dim == 2304
    assert tiny.scaled_size(480, 640) == (32, 42) and tiny.manifest()["config"] == "tiny"
    prescaled = _frames(61, 32, 42)  # a decoder that already scaled: same features as our resize skipped
    torch.testing.assert_close(tiny(prescaled), tiny(torch.stack([f[:, 5:37] for f in prescaled])), rtol=0, atol=0)


@pytest.mark.parametrize("n,clips", [(1, 1), (59, 1), (60, 1), (61, 2), (150, 3)])
def test_shapes_for_any_frame_count(tiny, n, clips):
    out = tiny(_frames(n))
    assert out.shape == (clips, tiny.dim) == (tiny.n_clips(n), 288)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and torch.isfinite(out).all()


def test_extractor_equals_the_recipe_by_hand(tiny):
    """ex(frames) == model(slow, fast) built from the hand-written indices, for every clip and batch size."""
    s = tiny.config.crop_size
    frames = _frames(100, s, s + 6)  # short side already = crop: only the centre crop (x0 = 3) applies
    clips = [POS30, [min(60 + p, 99) for p in POS30]]
    fast = normalize(torch.stack([frames[c][:, :, 3:3 + s] for c in clips]))  # (2, 3, 32, s, s)
    slow = fast[:, :, [0, 4, 8, 13, 17, 22, 26, 31]]
    with torch.no_grad():
        want = tiny.model(slow, fast)
    for ex in (tiny, SlowFastExtractor(test_config="tiny", batch_size=1)):
        torch.testing.assert_close(ex(frames), want, rtol=1e-5, atol=1e-6)


def test_chunks_of_whole_clips_equal_one_call(tiny):
    frames = _frames(150)
    whole = tiny(frames)
    torch.testing.assert_close(torch.cat([tiny(frames[:120]), tiny(frames[120:])]), whole, rtol=0, atol=0)
    assert not torch.allclose(tiny(frames[:90])[1], whole[1])  # a partial clip is padded, not the next frames


def test_deterministic(tiny):
    frames = _frames(70, seed=3)
    a = tiny(frames)
    b = SlowFastExtractor(test_config="tiny", batch_size=5)(frames.numpy())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, tiny(_frames(70, seed=4)))


def test_pytorchvideo_checkpoint_layout_loads(tmp_path, tiny):
    """A .pyth is {'model_state': state_dict, ...} with num_batches_tracked: strict load, same features."""
    ckpt = {"model_state": tiny.model.state_dict(), "epoch": 196, "cfg": "MODEL:\n  ARCH: slowfast\n"}
    torch.save(ckpt, tmp_path / "SLOWFAST_tiny.pyth")
    ex = SlowFastExtractor(weights=tmp_path / "SLOWFAST_tiny.pyth", test_config="tiny")
    frames = _frames(61)
    torch.testing.assert_close(ex(frames), tiny(frames), rtol=0, atol=0)


def test_oracle_weights_file_loads_into_the_r50_extractor():
    ex = SlowFastExtractor(weights=ORACLE / "weights_fp16.safetensors", device="cpu")
    assert ex.dim == 2304 and ex.weights.endswith("weights_fp16.safetensors")
    assert next(ex.model.parameters()).dtype == torch.float32


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and excinfo.type is SlowFastError
    return msg


def test_bad_weights_are_one_clear_line(tmp_path, tiny):
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=tmp_path / "nope.pyth")
    assert "no file" in _one_line(e) and "nope.pyth" in str(e.value)
    (tmp_path / "junk.pyth").write_bytes(b"not a checkpoint\n" * 4)
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=tmp_path / "junk.pyth")
    assert "junk.pyth" in _one_line(e) and "unreadable" in str(e.value)
    torch.save(tiny.model.state_dict(), tmp_path / "tiny.pt")  # the wrong architecture for R50
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=tmp_path / "tiny.pt")
    assert "tiny.pt" in _one_line(e) and "missing" in str(e.value)
    state = dict(tiny.model.state_dict(), **{"blocks.6.proj.weight": torch.zeros(400, 288)})
    torch.save(state, tmp_path / "k400.pt")
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=tmp_path / "k400.pt", test_config="tiny")
    assert "blocks.6.proj.weight has shape (400, 288), expected (10, 288)" in _one_line(e)
    torch.save({"s1.pathway0_stem.conv.weight": torch.zeros(1)}, tmp_path / "pyslowfast.pt")
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=tmp_path / "pyslowfast.pt", test_config="tiny")
    assert "PySlowFast names" in _one_line(e) and "missing" in str(e.value)
    torch.save({"model_state": {"a": 1}}, tmp_path / "odd.pyth")
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=tmp_path / "odd.pyth")
    assert "not a state_dict" in _one_line(e)


def test_bad_arguments_are_one_clear_line(tiny):
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor()
    assert "SLOWFAST_8x8_R50.pyth" in _one_line(e)
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(test_config="r101")
    assert "tiny" in _one_line(e)
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(test_config="tiny", batch_size=0)
    assert "batch_size" in _one_line(e)
    for bad, what in [(torch.zeros(4, 8, 8, 3), "float32"), (torch.zeros(4, 8, 8, dtype=torch.uint8), "(4, 8, 8)"),
                      (torch.zeros(0, 8, 8, 3, dtype=torch.uint8), "zero frames"), ([1, 2], "list")]:
        with pytest.raises(SlowFastError) as e:
            tiny(bad)
        assert what in _one_line(e)
    with pytest.raises(SlowFastError) as e:
        tiny(_frames(3), source_fps=0)
    assert "source_fps" in _one_line(e)


# ------------------------------------------------------------------------------------- PySlowFast Caffe2 .pkl

import pickle  # noqa: E402

from engine.extract.slowfast_convert import c2_names, main as convert_main  # noqa: E402


def test_c2_names_by_hand():
    """Examples from PySlowFast's c2_model_loading comments (``t_`` = fast; fusion after a stage's last block)."""
    names = c2_names()
    want = {
        "blocks.0.multipathway_blocks.0.conv.weight": "conv1_w",
        "blocks.0.multipathway_blocks.0.norm.weight": "res_conv1_bn_s",
        "blocks.0.multipathway_blocks.1.norm.running_var": "t_res_conv1_bn_riv",
        "blocks.0.multipathway_fusion.conv_fast_to_slow.weight": "t_pool1_subsample_w",
        "blocks.0.multipathway_fusion.norm.running_mean": "t_pool1_subsample_bn_rm",
        "blocks.1.multipathway_fusion.norm.bias": "t_res2_2_branch2c_bn_subsample_bn_b",
        "blocks.3.multipathway_fusion.conv_fast_to_slow.weight": "t_res4_5_branch2c_bn_subsample_w",
        "blocks.3.multipathway_blocks.0.res_blocks.4.branch2.norm_c.bias": "res4_4_branch2c_bn_b",
        "blocks.1.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight": "res2_0_branch2a_w",
        "blocks.2.multipathway_blocks.1.res_blocks.0.branch1_conv.weight": "t_res3_0_branch1_w",
        "blocks.4.multipathway_blocks.0.res_blocks.0.branch1_norm.weight": "res5_0_branch1_bn_s",
        "blocks.4.multipathway_blocks.1.res_blocks.2.branch2.norm_b.running_mean": "t_res5_2_branch2b_bn_rm",
        "blocks.6.proj.weight": "pred_w", "blocks.6.proj.bias": "pred_b",
    }
    assert {k: names[k] for k in want} == want
    assert len(names) == 552 == len(set(names.values()))  # every learned tensor, one blob each


def _write_c2(path, state, config=None, drop=None, protocol=2):
    blobs = {c2: state[k].numpy().astype(np.float32) for k, c2 in c2_names(config).items()}
    # PySlowFast's .pkl also holds optimiser blobs, skipped on load
    blobs.update({"conv1_w_momentum": np.zeros(1, np.float32), "lr": np.float32(0.1), "model_iter": np.int64(5)})
    blobs.pop(drop, None)
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=protocol))
    return path


def test_caffe2_pkl_loads_and_converts(tmp_path, tiny):
    pkl = _write_c2(tmp_path / "SLOWFAST_tiny.pkl", tiny.model.state_dict(), tiny.config)
    frames = _frames(61, seed=5)
    want = tiny(frames)
    torch.testing.assert_close(SlowFastExtractor(weights=pkl, test_config="tiny")(frames), want, rtol=0, atol=0)
    flat = {k: (v.flatten(1) if k.endswith("conv_c.weight") else v) for k, v in tiny.model.state_dict().items()}
    pkl2 = _write_c2(tmp_path / "flat.pkl", flat, tiny.config)  # 1x1x1 convs stored 2-D: padded like PySlowFast
    torch.testing.assert_close(SlowFastExtractor(weights=pkl2, test_config="tiny")(frames), want, rtol=0, atol=0)
    # the R50 CLI on a tiny .pkl: exit 2, one line; on a real-shaped one it writes loadable safetensors
    assert convert_main([str(pkl), str(tmp_path / "x.safetensors")]) == 2
    assert convert_main([str(pkl), str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_caffe2_cli_writes_r50_safetensors(tmp_path, capsys, oracle_state):
    pkl = _write_c2(tmp_path / "SLOWFAST_8x8_R50.pkl", oracle_state, protocol=4)
    out = tmp_path / "slowfast_c2.safetensors"
    assert convert_main([str(pkl), "--out", str(out)]) == 0 and f"wrote {out}: 552 tensors" in capsys.readouterr().err
    got = load_file(str(out))
    assert set(got) == set(oracle_state) and all(torch.equal(got[k], oracle_state[k]) for k in got)
    out.unlink()
    assert convert_main([str(pkl), "--quiet"]) == 0 and capsys.readouterr() == ("", "")  # default: PKL .safetensors
    assert load_file(str(tmp_path / "SLOWFAST_8x8_R50.safetensors")).keys() == got.keys()


def test_bad_caffe2_pkl_is_one_line(tmp_path, tiny):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"blobs": Evil()}, protocol=2))
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=tmp_path / "evil.pkl", test_config="tiny")
    assert "refusing to load" in _one_line(e) and "print" in str(e.value)  # nothing ran
    (tmp_path / "empty.pkl").write_bytes(pickle.dumps({}, protocol=2))
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=tmp_path / "empty.pkl", test_config="tiny")
    assert "no 'blobs' dict" in _one_line(e)
    state = dict(tiny.model.state_dict())
    state["blocks.1.multipathway_blocks.0.res_blocks.0.branch2.conv_c.weight"] = torch.zeros(16, 8)
    pkl = _write_c2(tmp_path / "bad_shape.pkl", state, tiny.config)
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=pkl, test_config="tiny")
    assert "blob res2_0_branch2c_w has shape (16, 8, 1, 1, 1)" in _one_line(e)  # padded with 1s, still wrong
    pkl = _write_c2(tmp_path / "short.pkl", tiny.model.state_dict(), tiny.config, drop="t_pool1_subsample_w")
    with pytest.raises(SlowFastError) as e:
        SlowFastExtractor(weights=pkl, test_config="tiny")
    assert "1 blobs missing" in _one_line(e) and "t_pool1_subsample_w" in str(e.value)


def test_cuda_convolutions_run_in_fp32_and_the_setting_is_restored():
    from engine.extract.slowfast import _no_tf32

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with _no_tf32(torch.device("cuda")):
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
    with _no_tf32(torch.device("cpu")):
        assert conv.fp32_precision == before
