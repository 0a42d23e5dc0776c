"""The reference model: shapes, masks, padding invariance, gradients, parameter counts, the loop, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import random_batch
from reference import LDDETR, InputError, LDDETRConfig, validate_inputs, warmup_alpha
from reference.heads import top1_slice_bounds


def test_output_shapes_train_and_eval(small_cfg):
    model = LDDETR(small_cfg)
    video, vmask, text, tmask = random_batch(small_cfg, [13, 9, 11], [7, 5, 6])
    out = model(video, vmask, text, tmask)  # training mode
    assert out["pred_logits"].shape == (3, 10, 2)
    assert out["pred_spans"].shape == (3, 10, 2)
    assert out["saliency_scores"].shape == (3, 13)
    assert out["loss_align"].dim() == 0 and out["loss_sim"].dim() == 0
    assert len(out["aux_outputs"]) == small_cfg.num_decoder_layers - 1
    assert out["aux_outputs"][0]["pred_spans"].shape == (3, 10, 2)
    assert ((out["pred_spans"] > 0) & (out["pred_spans"] < 1)).all()
    model.eval()
    with torch.no_grad():
        out = model(video, vmask.float(), text, tmask.float())  # {0,1} float masks accepted
    assert "loss_align" not in out and "loss_sim" not in out
    assert out["video_mask"].dtype == torch.bool
    assert torch.isfinite(out["saliency_scores"]).all()


def test_eval_never_touches_queue_or_momentum(small_cfg):
    model = LDDETR(small_cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    video, vmask, text, tmask = random_batch(small_cfg, [8, 8], [5, 5])
    with torch.no_grad():
        model(video, vmask, text, tmask)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_training_updates_queue_and_momentum(small_cfg):
    model = LDDETR(small_cfg)
    with torch.no_grad():
        for p in model.video_encoder.parameters():
            p.add_(0.1)  # online != momentum, so the EMA step is visible
    m_before = model.momentum_video_encoder.linear1.weight.clone()
    q_before = model.distill_align.vid_queue.clone()
    video, vmask, text, tmask = random_batch(small_cfg, [8, 6], [5, 4])
    model(video, vmask, text, tmask)
    m = small_cfg.momentum
    expected = m * m_before + (1 - m) * model.video_encoder.linear1.weight
    torch.testing.assert_close(model.momentum_video_encoder.linear1.weight, expected)
    assert int(model.distill_align.queue_ptr) == 2
    assert not torch.equal(model.distill_align.vid_queue[:, :2], q_before[:, :2])
    assert torch.equal(model.distill_align.vid_queue[:, 2:], q_before[:, 2:])
    torch.testing.assert_close(model.distill_align.vid_queue[:, :2].norm(dim=0), torch.ones(2))
    # a batch that does not divide the queue length is not enqueued (official rule)
    video, vmask, text, tmask = random_batch(small_cfg, [8, 6, 5], [5, 4, 3])
    model(video, vmask, text, tmask)
    assert int(model.distill_align.queue_ptr) == 2


@pytest.mark.parametrize("loops", [1, 3])
def test_padding_invariance(small_cfg, loops):
    """A sample's eval outputs are the same alone or batched with longer videos / texts (padding = noise)."""
    cfg = LDDETRConfig(**{**small_cfg.to_dict(), "decoder_loops": loops})
    model = LDDETR(cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a leak through the convs would be visible
        for blk in model.convolutional_fuser.convolutional_block.blocks:
            for bn in (blk.bn1, blk.bn2):
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    lengths, text_lengths = [23, 9, 17, 30], [7, 11, 3, 5]
    video, vmask, text, tmask = random_batch(cfg, lengths, text_lengths)
    with torch.no_grad():
        batched = model(video, vmask, text, tmask)
        for b, (t, n) in enumerate(zip(lengths, text_lengths)):
            alone = model(video[b:b + 1, :t], vmask[b:b + 1, :t], text[b:b + 1, :n], tmask[b:b + 1, :n])
            for key in ("pred_logits", "pred_spans"):
                torch.testing.assert_close(batched[key][b], alone[key][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched["saliency_scores"][b, :t], alone["saliency_scores"][0], atol=1e-5,
                                       rtol=0)
            torch.testing.assert_close(batched["aux_outputs"][0]["pred_spans"][b], alone["aux_outputs"][0]["pred_spans"][0],
                                       atol=1e-5, rtol=0)


def _grads_after_one_step(cfg):
    model = LDDETR(cfg)
    video, vmask, text, tmask = random_batch(cfg, [11, 7], [6, 4])
    out = model(video, vmask, text, tmask)
    loss = out["loss_align"] + out["loss_sim"] + out["saliency_scores"].pow(2).mean()
    loss = loss + out["pred_logits"].pow(2).mean() + out["pred_spans"].pow(2).mean()
    loss = loss + sum(a["pred_logits"].pow(2).mean() + a["pred_spans"].pow(2).mean() for a in out["aux_outputs"])
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_every_trainable_parameter_gets_a_gradient(small_cfg):
    """With the paper's loop (default 3 passes) every trainable parameter receives a non-zero gradient."""
    grads = _grads_after_one_step(small_cfg)
    missing = [n for n, g in grads.items() if g is None or not torch.any(g != 0)]
    assert missing == []


def test_release_loop_zero_gradient_exceptions(small_cfg):
    """decoder_loops=1 (the release): layer 0's self-attention content projections see tgt = 0, so exactly
    their weights get a zero gradient (spec §7.1.1); everything else still learns."""
    cfg = LDDETRConfig(**{**small_cfg.to_dict(), "decoder_loops": 1})
    grads = _grads_after_one_step(cfg)
    zero = sorted(n for n, g in grads.items() if g is None or not torch.any(g != 0))
    prefix = "loop_decoder.transformer_decoder.layers.0."
    assert zero == sorted(prefix + p for p in ("sa_kcontent_proj.weight", "sa_qcontent_proj.weight", "sa_v_proj.weight"))


def test_momentum_encoders_are_frozen(small_cfg):
    model = LDDETR(small_cfg)
    assert not any(p.requires_grad for p in model.momentum_video_encoder.parameters())
    assert not any(p.requires_grad for p in model.momentum_text_encoder.parameters())


@pytest.mark.parametrize("preset, overrides, trainable, total", [
    # official 11,927,848 trainable / 12,920,108 total, minus the unused 8,704-value text positional table
    ("qvhighlights", {}, 11_919_144, 12_911_404),
    ("qvhighlights", {"use_txt_pos": True}, 11_927_848, 12_920_108),
    ("charades", {"use_txt_pos": True}, 11_533_096, 12_525_356),
])
def test_parameter_counts_match_official(preset, overrides, trainable, total):
    model = LDDETR(LDDETRConfig.preset(preset, queue_length=8, **overrides))
    assert model.num_parameters() == trainable
    assert model.num_parameters(trainable_only=False) == total


@pytest.mark.parametrize("loops", [1, 3])
def test_decoder_runs_once_per_loop(small_cfg, loops):
    cfg = LDDETRConfig(**{**small_cfg.to_dict(), "decoder_loops": loops})
    model = LDDETR(cfg).eval()
    calls = []
    model.loop_decoder.transformer_decoder.register_forward_hook(lambda *a: calls.append(1))
    video, vmask, text, tmask = random_batch(cfg, [10, 8], [5, 5])
    with torch.no_grad():
        model(video, vmask, text, tmask)
    assert len(calls) == loops


def test_loop_feeds_last_output_back_with_reset_anchors(small_cfg):
    """Paper eq. 29-31: Q_0 = 0, Q_i = TD(Q_{i-1}, R) with the learned anchors each time; last pass returned."""
    model = LDDETR(small_cfg).eval()
    dec = model.loop_decoder.transformer_decoder
    b, length, d = 2, 12, 256
    memory, pos = torch.randn(length, b, d), torch.randn(length, b, d)
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, 9:] = True
    anchors = model.query_embed.weight
    with torch.no_grad():
        hs, refs = model.loop_decoder(memory, pad, pos, anchors)
        tgt = torch.zeros(10, b, d)
        for _ in range(3):
            hs_i, refs_i = dec(tgt, memory, pad, pos, anchors[:, None].repeat(1, b, 1))
            tgt = hs_i[-1].transpose(0, 1)
        one_hs, _ = dec(torch.zeros(10, b, d), memory, pad, pos, anchors[:, None].repeat(1, b, 1))
    torch.testing.assert_close(hs, hs_i, atol=0, rtol=0)
    torch.testing.assert_close(refs, refs_i, atol=0, rtol=0)
    assert (hs - one_hs).abs().max() > 1e-3  # the loop changes the result
    torch.testing.assert_close(refs[:, :, :, :][0], anchors.sigmoid()[None].expand(b, -1, -1))


def test_top1_slice_bounds_follow_python_slicing():
    torch.manual_seed(3)
    b, q = 64, 10
    logits = torch.randn(b, q, 2)
    spans = torch.rand(b, q, 2)  # centers/widths in (0, 1): starts can be negative, ends beyond 1
    lengths = torch.randint(1, 40, (b,))
    start, stop = top1_slice_bounds(logits, spans, lengths, clip_length=2.0)
    best = logits.softmax(-1)[..., 0].argmax(1)
    saw_negative = False
    for i in range(b):
        c, w = spans[i, best[i]].tolist()
        t = int(lengths[i])
        s = int(torch.floor(torch.tensor((c - w / 2) * (t * 2.0) / 2.0)))
        e = int(torch.floor(torch.tensor((c + w / 2) * (t * 2.0) / 2.0)))
        saw_negative |= s < 0
        expected = list(range(t))[s:e + 1]
        got = list(range(t))[int(start[i]):int(stop[i])]
        assert got == expected, (i, s, e, t)
    assert saw_negative


def test_highlight_head_gru_sees_the_slice_padded_to_own_length(small_cfg):
    model = LDDETR(small_cfg).eval()
    head = model.prediction_heads.highlight_detection_prediction_head
    seen = []
    head.gru.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    lengths = torch.tensor([9, 5])
    vid, mem = torch.randn(2, 9, 256), torch.randn(2, 9, 256)
    logits, spans = torch.randn(2, 10, 2), torch.rand(2, 10, 2)
    with torch.no_grad():
        sal = head(logits, spans, vid, mem, lengths)
        start, stop = top1_slice_bounds(logits, spans, lengths, small_cfg.clip_length)
        for b in range(2):
            t = int(lengths[b])
            sl = vid[b, int(start[b]):int(stop[b])]
            expected = torch.cat([sl, torch.zeros(t - len(sl), 256)])
            torch.testing.assert_close(seen[0][b, :t], expected)
            # GRU state after T_b steps of the padded slice
            _, h = head.gru(expected[None])
            w = vid[b, :t] @ h[0, 0]
            ref = head.saliency_proj(mem[b, :t] * (1 + w[:, None])).sum(-1) / 16.0
            torch.testing.assert_close(sal[b, :t], ref, atol=1e-5, rtol=1e-5)


def test_warmup_alpha():
    assert warmup_alpha(0.4, epoch=0, batch_idx=0, num_batches=10) == 0.0
    assert warmup_alpha(0.4, epoch=0, batch_idx=5, num_batches=10) == pytest.approx(0.2)
    assert warmup_alpha(0.4, epoch=1, batch_idx=0, num_batches=10) == 0.4


# ---- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, match", [
    (lambda v, vm, t, tm: (v[..., :-1], vm, t, tm), r"video feature dim: expected 34 .* got 33"),
    (lambda v, vm, t, tm: (v, vm, t[..., :5], tm), r"text feature dim: expected 24 .* got 5"),
    (lambda v, vm, t, tm: (v, vm[:, :-1], t, tm), r"video_mask shape \(2, 9\) does not match video"),
    (lambda v, vm, t, tm: (v, vm, t, tm[:, :-2]), r"text_mask shape"),
    (lambda v, vm, t, tm: (v[0], vm, t, tm), r"video must be \(B, T, D\)"),
    (lambda v, vm, t, tm: (v, vm, t[:1], tm[:1]), r"batch size differs"),
])
def test_bad_shapes_raise_clear_errors(small_cfg, mutate, match):
    model = LDDETR(small_cfg).eval()
    args = mutate(*random_batch(small_cfg, [10, 7], [5, 3]))
    with pytest.raises(InputError, match=match):
        model(*args)


def test_too_long_video_raises(small_cfg):
    model = LDDETR(small_cfg).eval()
    with pytest.raises(InputError, match=r"76 clips, above the configured maximum max_v_l=75"):
        model(*random_batch(small_cfg, [76], [4]))
    uncapped = LDDETR(LDDETRConfig(**{**small_cfg.to_dict(), "max_v_l": -1})).eval()
    with torch.no_grad():
        assert uncapped(*random_batch(small_cfg, [80], [4]))["saliency_scores"].shape == (1, 80)


def test_validate_inputs_value_errors(small_cfg):
    video, vmask, text, tmask = random_batch(small_cfg, [10, 7], [5, 3])
    validate_inputs(video, vmask, text, tmask, v_feat_dim=34, t_feat_dim=24)  # fine
    bad = vmask.clone(); bad[1] = False
    with pytest.raises(InputError, match=r"sample 1 \(id 'q7'\) has no valid clip"):
        validate_inputs(video, bad, text, tmask, ids=["q3", "q7"])
    bad = tmask.clone(); bad[0] = False
    with pytest.raises(InputError, match=r"sample 0 has no valid token"):
        validate_inputs(video, vmask, text, bad)
    nan = video.clone(); nan[1, 4, 2] = float("nan")
    with pytest.raises(InputError, match=r"video features of sample 1 contain NaN/inf \(first at position 4\)"):
        validate_inputs(nan, vmask, text, tmask)
    nan[1, 4, 2] = 0.0; nan[1, 8, 0] = float("inf")  # inside the padding: allowed
    validate_inputs(nan, vmask, text, tmask)
    holes = vmask.clone(); holes[0, 3] = False
    with pytest.raises(InputError, match=r"video_mask of sample 0 is not a prefix"):
        validate_inputs(video, holes, text, tmask)
    with pytest.raises(InputError, match=r"text_mask of sample 0 has values other than 0/1"):
        validate_inputs(video, vmask, text, tmask.float() * 0.5)


def test_config_presets_and_errors():
    cfg = LDDETRConfig.preset("charades")
    assert (cfg.clip_length, cfg.num_convolutional_blocks, cfg.distillation_coefficient) == (1.0, 4, 0.3)
    assert (cfg.sim_loss_coef, cfg.lw_saliency, cfg.n_epoch, cfg.max_video_len) == (0.4, 1.5, 100, None)
    assert LDDETRConfig.preset("tacos").distillation_coefficient == 0.7
    assert LDDETRConfig.preset("qvhighlights").v_feat_dim == 2818
    assert LDDETRConfig.preset("tvsum").v_feat_dim == 2050
    assert LDDETRConfig.preset("qvhighlights", decoder_loops=1).decoder_loops == 1
    with pytest.raises(ValueError, match=r"unknown preset 'qvhighlight'.*Did you mean 'qvhighlights'"):
        LDDETRConfig.preset("qvhighlight")
    with pytest.raises(ValueError, match=r"unknown LDDETRConfig field\(s\) \['decoder_loop'\]"):
        LDDETRConfig.preset("tacos", decoder_loop=2)
    with pytest.raises(ValueError, match=r"hidden_dim must be 256"):
        LDDETRConfig(hidden_dim=128)
    assert LDDETRConfig.from_dict(cfg.to_dict()) == cfg


def test_one_optimizer_step_lowers_the_loss(small_cfg):
    """Batch 2, AdamW at the official lr / weight decay / grad clip: the total loss on the same batch drops."""
    from reference.losses import build_criterion

    cfg = LDDETRConfig(**{**small_cfg.to_dict(), "dropout": 0.0, "input_dropout": 0.0, "v2t_dropout": 0.0})
    model, criterion = LDDETR(cfg), build_criterion(cfg)
    video, vmask, text, tmask = random_batch(cfg, [15, 11], [6, 4])
    targets = {
        "span_labels": [torch.tensor([[0.3, 0.2], [0.7, 0.1]]), torch.tensor([[0.5, 0.4]])],
        "saliency_pos_labels": torch.tensor([[4, 3], [5, 6]]),
        "saliency_neg_labels": torch.tensor([[10, 12], [0, 9]]),
        "saliency_all_labels": (torch.rand(2, 15) * 12).round() * vmask,
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.wd)

    def total():
        return criterion(model(video, vmask, text, tmask), targets)["loss"]

    before = total()
    before.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    with torch.no_grad():
        after = total()
    assert torch.isfinite(before) and after < before - 1e-3, (float(before), float(after))


def test_one_video_several_queries_is_broadcast(small_cfg):
    model = LDDETR(small_cfg).eval()
    video, vmask, text, tmask = random_batch(small_cfg, [12, 12, 12], [5, 7, 3])
    with torch.no_grad():
        full = model(video[:1].expand(3, -1, -1), vmask[:1].expand(3, -1), text, tmask)
        once = model(video[:1], vmask[:1], text, tmask)
    for key in ("pred_logits", "pred_spans", "saliency_scores"):
        torch.testing.assert_close(once[key], full[key], atol=1e-6, rtol=0)


def test_enqueue_wraps_around_an_unaligned_pointer():
    from reference.distill_align import DistillAlign

    da = DistillAlign(hidden_dim=4, queue_length=8)
    da.queue_ptr[0] = 6
    feats = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)
    da.enqueue(feats, feats)
    torch.testing.assert_close(da.vid_queue[:, [6, 7, 0, 1]], feats.t())
    assert int(da.queue_ptr) == 2
