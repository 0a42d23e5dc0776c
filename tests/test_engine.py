"""The inference engine (engine/inference.py) against the reference model: parity at odd lengths with
padding, buckets, dtype, op-count gates (no host syncs), graph breaks, and what it drops."""

from __future__ import annotations

import pytest
import torch

from conftest import OpCounter, random_batch, randomize_bn_stats_
from engine.inference import Engine, build
from reference import LDDETR

KEYS = ("pred_logits", "pred_spans", "saliency_scores")


def _model(cfg) -> LDDETR:
    return randomize_bn_stats_(LDDETR(cfg).eval())


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _assert_matches_reference(model, eng, batch, tol: float = 1e-4) -> tuple[dict, dict]:
    """Every output of the engine within ``tol`` (relative) of the reference's eval forward; returns both."""
    with torch.no_grad():
        ref = model(*batch)
    out = eng(*batch)
    for key in KEYS:
        assert _rel(out[key], ref[key]) < tol, key
    return out, ref


@pytest.mark.parametrize("lengths", [[37], [37, 29, 33], [75], [75, 60, 71]])
def test_engine_matches_reference(fresh_seed, small_cfg, lengths):
    model = _model(small_cfg)
    eng = build(model, device="cpu")
    batch = random_batch(small_cfg, lengths, [7, 5, 9][: len(lengths)])
    out, ref = _assert_matches_reference(model, eng, batch)
    torch.testing.assert_close(out["saliency_scores"], ref["saliency_scores"], rtol=1e-4, atol=1e-5)


def test_buckets_pad_and_give_the_same_outputs(fresh_seed, small_cfg):
    model = _model(small_cfg)
    eng = build(model, device="cpu", buckets=(48, 75))
    assert eng.bucket_length(37) == 48 and eng.bucket_length(75) == 75 and eng.bucket_length(20) == 48
    batch = random_batch(small_cfg, [37, 30, 25], [7, 5, 9])
    out, ref = _assert_matches_reference(model, eng, batch)
    assert out["saliency_scores"].shape == ref["saliency_scores"].shape


def test_bf16_autocast(fresh_seed, small_cfg):
    """The bf16 engine against the reference under the same autocast and against fp32.

    Spans: within 1e-2 of fp32. Saliency: random weights make it ill-conditioned in bf16 — the top two
    queries' scores are typically 1e-5..1e-4 apart, so bf16 rounding picks either top-1 moment (a different
    GRU input slice), and its entries nearly cancel (the reference's own bf16 error reached 0.42 of the
    output's scale over 40 seeds). So it is compared like for like, on the samples whose top-1 slice the
    engine and the bf16 reference share, as max |error| / max |fp32 saliency| <= 0.25 (0.18 at worst over
    40 seeds; an output of zeros or of the wrong slice scores ~1). The tight bf16 checks are on a GPU
    (``bench.gpu`` parity) and in the fp32 tests here."""
    from reference.heads import top1_slice_bounds

    model = _model(small_cfg)
    eng = build(model, device="cpu", dtype=torch.bfloat16)
    batch = random_batch(small_cfg, [37, 30, 33, 25], [7, 5, 9, 3])
    with torch.no_grad():
        ref32 = model(*batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16 = model(*batch)
    out = eng(*batch)
    assert _rel(out["pred_spans"], ref32["pred_spans"]) < 1e-2
    assert torch.isfinite(out["saliency_scores"][batch[1]]).all()
    lengths = batch[1].sum(1)

    def slice_of(o):
        start, stop = top1_slice_bounds(o["pred_logits"].float(), o["pred_spans"].float(), lengths,
                                        small_cfg.clip_length)
        return torch.stack((start, stop), 1)

    same = (slice_of(out) == slice_of(ref16)).all(1)
    keep = same[:, None] & batch[1]
    assert keep.any(), "no sample kept the reference's top-1 slice: the saliency comparison would be empty"
    scale = ref32["saliency_scores"][batch[1]].abs().max()
    err = ((out["saliency_scores"].float() - ref16["saliency_scores"].float()).abs()[keep].max() / scale).item()
    print(f"saliency: engine vs reference bf16, {int(same.sum())} samples, {err:.3f} of the fp32 scale")
    assert err <= 0.25


def _op_counts(small_cfg):
    """Dispatched aten ops of one reference and one engine forward, both in the engine's own grad mode
    (inference_mode): counts taken in different modes differ for reasons unrelated to the engine."""
    model = _model(small_cfg)
    eng = build(model, device="cpu")
    batch = random_batch(small_cfg, [37, 29, 33], [7, 5, 9])
    with torch.inference_mode(), OpCounter() as ref_ops:
        model(*batch)
    with torch.inference_mode(), OpCounter() as eng_ops:
        eng(*batch)
    return ref_ops.counts, eng_ops.counts


def test_no_host_sync_and_no_batch_norm(small_cfg):
    """Zero aten._local_scalar_dense (a GPU->host sync) in the inference forward; BN folded (no
    batch_norm ops)."""
    _, eng_ops = _op_counts(small_cfg)
    assert eng_ops["aten._local_scalar_dense"] == 0
    assert eng_ops["aten.native_batch_norm"] + eng_ops["aten._native_batch_norm_legit_no_training"] == 0


@pytest.mark.xfail(strict=True, reason="in the same grad mode the engine dispatches more aten ops than the "
                                       "reference (1498 vs 1208 here: 120 aten.to among them); the earlier pass "
                                       "compared counts taken in different grad modes (issue 13)")
def test_fewer_ops_than_the_reference(small_cfg):
    ref_ops, eng_ops = _op_counts(small_cfg)
    assert sum(eng_ops.values()) < sum(ref_ops.values())


def test_loop_decoder_has_no_graph_break(small_cfg):
    model = _model(small_cfg)
    captured = {}
    decoder = model.loop_decoder

    def spy(*args, **kwargs):
        captured.update(args=args, kwargs=kwargs)
        return type(decoder).forward(decoder, *args, **kwargs)

    decoder.forward = spy
    with torch.no_grad():
        model(*random_batch(small_cfg, [37, 29], [7, 5]))
    del decoder.forward
    with torch.no_grad():
        explained = torch._dynamo.explain(decoder)(*captured["args"], **captured["kwargs"])
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


@pytest.mark.parametrize("what", ["decoder", "model"])
def test_compiled_engine_matches(fresh_seed, small_cfg, what):
    """fullgraph=True capture (the eager backend: dynamo's capture without inductor's compile time) of the
    decoder or of the whole forward, GRU included, then parity."""
    model = _model(small_cfg)
    eng = build(model, device="cpu", compile=what, compile_backend="eager")
    batch = random_batch(small_cfg, [37, 29], [7, 5])
    _assert_matches_reference(model, eng, batch)


def test_engine_is_inference_only_and_drops_training_state(small_cfg):
    model = _model(small_cfg)
    eng = build(model, device="cpu")
    assert isinstance(eng, Engine) and not eng.training
    assert eng.model.momentum_video_encoder is None and eng.model.distill_align.vid_queue.numel() == 0
    assert model.momentum_video_encoder is not None and model.distill_align.vid_queue.numel() > 0  # untouched
    with pytest.raises(RuntimeError, match="inference-only"):
        eng.train()
    with pytest.raises(TypeError, match="LDDETR or a checkpoint"):
        build(object())
    with pytest.raises(ValueError, match="dtype"):
        build(model, dtype=torch.float64)
    with pytest.raises(ValueError, match="compile"):
        build(model, compile="everything")


def test_build_from_checkpoint(tmp_path, small_cfg):
    from engine import save_checkpoint

    model = _model(small_cfg)
    path = save_checkpoint(model, tmp_path / "m.pt")
    eng = build(path, device="cpu")
    batch = random_batch(small_cfg, [21, 17], [6, 4])
    with torch.no_grad():
        ref = model(*batch)
    out = eng(*batch)
    assert _rel(out["pred_spans"], ref["pred_spans"]) < 1e-4


def test_same_top1_windows_on_synthetic_val(tiny_synthetic, small_cfg):
    """Reference and engine give the same top-1 windows (and near-equal saliency) over a synthetic split."""
    from engine.data import MomentDataset, load_annotations, make_loader
    from engine.features import feature_spec_for
    from engine.train import predict_loader

    spec = feature_spec_for("synthetic", tiny_synthetic)
    cfg = small_cfg.__class__.preset("qvhighlights", v_feat_dim=spec.v_feat_dim, t_feat_dim=spec.t_feat_dim,
                                     queue_length=64)
    model = _model(cfg)
    ann = load_annotations(sorted(tiny_synthetic.glob("*val*.jsonl"))[0])
    loader = make_loader(MomentDataset(ann, tiny_synthetic, spec, dataset="synthetic", load_labels=False), 3,
                         shuffle=False)
    device = torch.device("cpu")
    ref = predict_loader(model, loader, device, cfg, "synthetic")
    eng = predict_loader(build(model, device="cpu"), loader, device, cfg, "synthetic")
    assert [r["qid"] for r in ref] == [r["qid"] for r in eng]
    for a, b in zip(ref, eng):
        assert a["pred_relevant_windows"][0][:2] == b["pred_relevant_windows"][0][:2], a["qid"]


def test_text_buckets_pad_and_give_the_same_outputs(fresh_seed, small_cfg):
    model = _model(small_cfg)
    eng = build(model, device="cpu", buckets=(48, 75), text_buckets=(8, 16))
    assert eng.text_bucket_length(9) == 16 and eng.text_bucket_length(3) == 8 and eng.text_bucket_length(20) == 20
    batch = random_batch(small_cfg, [37, 30, 25], [7, 5, 9])
    _assert_matches_reference(model, eng, batch)


def test_cuda_graph_options(small_cfg):
    model = _model(small_cfg)
    assert build(model, device="cpu").graph_max_batch == 0  # "auto": CUDA only
    with pytest.raises(ValueError, match="CUDA device"):
        build(model, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs"):
        build(model, device="cpu", cuda_graphs="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_matches_eager(fresh_seed, small_cfg, dtype, strict_fp32):
    """One graph per input shape; replays equal the eager engine on new inputs; returned tensors are not the
    graph's static buffers (a later replay leaves them alone)."""
    model = _model(small_cfg).cuda()
    eager = build(model, device="cuda", dtype=dtype, cuda_graphs=False)
    graphed = build(model, device="cuda", dtype=dtype, cuda_graphs=True)
    first = None
    for lengths, tl in (([37, 29, 33], [7, 5, 9]), ([37, 30, 20], [6, 5, 9]), ([75], [12]), ([75], [3])):
        batch = [x.cuda() for x in random_batch(small_cfg, lengths, tl)]
        ref, out = eager(*batch), graphed(*batch)
        for key in KEYS:
            assert _rel(out[key], ref[key]) < (1e-5 if dtype == torch.float32 else 1e-3), key
        if first is None:
            first, kept = out, {k: v.clone() for k, v in out.items()}
    assert graphed.num_graphs == 3  # shapes (B, T bucket, N bucket): (3, 75, 16) twice, (1, 75, 16), (1, 75, 8)
    for k in KEYS:
        assert torch.equal(first[k], kept[k]), k


def test_bf16_precast_weights_are_bit_identical_and_skip_the_casts(fresh_seed, small_cfg):
    """Storing the linear/attention weights in bf16 once gives exactly autocast's per-use casts, with far
    fewer cast ops per forward (the Loop Decoder reuses its weights every loop)."""
    model = _model(small_cfg)
    plain = build(model, device="cpu", dtype=torch.bfloat16, precast_weights=False)
    fast = build(model, device="cpu", dtype=torch.bfloat16)
    assert fast.model.loop_decoder.transformer_decoder.layers[0].sa_qcontent_proj.weight.dtype == torch.bfloat16
    assert plain.model.loop_decoder.transformer_decoder.layers[0].sa_qcontent_proj.weight.dtype == torch.float32
    batch = random_batch(small_cfg, [37, 30], [7, 5])

    def run_counting_decoder_ops(eng):
        """The Loop Decoder's ops (an OpCounter over the whole forward trips the CPU GRU under autocast)."""
        counter = OpCounter()
        dec = eng.model.loop_decoder
        hooks = [dec.register_forward_pre_hook(lambda *a: None if counter.__enter__() else None),
                 dec.register_forward_hook(lambda *a: None if counter.__exit__(None, None, None) else None)]
        try:
            return eng(*batch), counter
        finally:
            for h in hooks:
                h.remove()

    a, plain_ops = run_counting_decoder_ops(plain)
    b, fast_ops = run_counting_decoder_ops(fast)
    for key in KEYS:
        assert torch.equal(a[key], b[key]), key
    casts = lambda ops: ops.counts["aten.to"] + ops.counts["aten._to_copy"]  # noqa: E731
    print("cast ops per Loop Decoder pass:", casts(plain_ops), "->", casts(fast_ops))
    assert casts(fast_ops) < casts(plain_ops) / 3


@pytest.mark.slow
def test_inductor_compiled_engine_matches(fresh_seed, small_cfg):
    """The whole forward through inductor on CPU (~4 minutes on 2 cores): inductor's SDPA pattern rewrite
    (_sfdp_replacement_29) used to mis-broadcast the decoder's cross-attention mask here (a compile error);
    the decoder now hands SDPA contiguous heads."""
    model = _model(small_cfg)
    eng = build(model, device="cpu", compile="model")
    batch = random_batch(small_cfg, [37, 29, 33], [7, 5, 9])
    _assert_matches_reference(model, eng, batch)
