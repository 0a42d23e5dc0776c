"""Tests for reference/losses.py against hand-computed values and an official-style RAC loop."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.config import LDDETRConfig
from reference.losses import (
    SetCriterion,
    build_criterion,
    build_weight_dict,
    rank_contrastive_loss,
    saliency_margin_loss,
    sigmoid_focal_loss,
)
from reference.matcher import HungarianMatcher

# Default weights of spec §3, written out (not read from the code under test).
DEFAULT_WEIGHTS = {"loss_span": 10.0, "loss_giou": 1.0, "loss_label": 4.0, "loss_saliency": 1.0,
                   "loss_align": 0.6, "loss_sim": 0.6, "loss_span_0": 10.0, "loss_giou_0": 1.0, "loss_label_0": 4.0}


def _criterion(**kw):
    return SetCriterion(HungarianMatcher(), dict(DEFAULT_WEIGHTS), **kw)


def _random_batch(bs=3, q=5, length=8, sizes=(2, 1, 3), seed=0, aux=True):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(bs, q, 2, generator=g, requires_grad=True),
        "pred_spans": (torch.rand(bs, q, 2, generator=g) * 0.5 + 0.1).requires_grad_(True),
        "saliency_scores": torch.randn(bs, length, generator=g, requires_grad=True),
        "video_mask": torch.ones(bs, length, dtype=torch.bool),
    }
    outputs["video_mask"][0, -2:] = False  # a padded sample
    if aux:
        outputs["aux_outputs"] = [{"pred_logits": torch.randn(bs, q, 2, generator=g, requires_grad=True),
                                   "pred_spans": (torch.rand(bs, q, 2, generator=g) * 0.5 + 0.1).requires_grad_(True)}]
    labels = torch.randint(0, 13, (bs, length), generator=g).float()
    labels[0, -2:] = 0
    targets = {
        "span_labels": [torch.rand(n, 2, generator=g) * 0.5 + 0.1 for n in sizes],
        "saliency_pos_labels": torch.randint(0, length - 2, (bs, 2), generator=g),
        "saliency_neg_labels": torch.randint(0, length - 2, (bs, 2), generator=g),
        "saliency_all_labels": labels,
    }
    return outputs, targets


# ---- focal ----------------------------------------------------------------------------------------------
def test_focal_direct_formula():
    # p = sigmoid(x); ce = -[t log p + (1-t) log(1-p)]; p_t = p t + (1-p)(1-t); alpha_t = .25 t + .75 (1-t)
    # x=0,t=1: p=.5, ce=ln2=.693147, (1-p_t)^2=.25 -> .25*.25*.693147 = .0433217
    # x=0,t=0: alpha_t=.75 -> .75*.25*.693147 = .1299651
    # x=2,t=1: p=.880797, ce=.126928, (1-p)^2=.0142094 -> .25*.0142094*.126928 = .000450891
    # x=-1,t=0: p=.268941, ce=-ln(.731059)=.313262, (p)^2=.0723295 -> .75*.0723295*.313262 = .0169935
    got = sigmoid_focal_loss(torch.tensor([0.0, 0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([0.0433217, 0.1299651, 0.000450891, 0.0169935]),
                               rtol=1e-5, atol=1e-7)
    # gamma = 0, alpha < 0 reduces to plain BCE: x=0 -> ln 2
    got = sigmoid_focal_loss(torch.tensor([0.0]), torch.tensor([1.0]), alpha=-1.0, gamma=0.0)
    assert got.item() == pytest.approx(math.log(2), rel=1e-6)


def test_loss_label_hand_value():
    # one target on q0 (exact span); q1 far away.  one-hot targets: q0 -> [1, 0], q1 -> [0, 1].
    # entries: (x=2,t=1) .000450891, (x=-1,t=0) .0169935, (x=0,t=0) .1299651, (x=0,t=1) .0433217
    # mean over B*Q*2 = 4 entries = .0476828
    outputs = {"pred_logits": torch.tensor([[[2.0, -1.0], [0.0, 0.0]]]),
               "pred_spans": torch.tensor([[[0.3, 0.2], [0.8, 0.1]]])}
    losses = _criterion()(outputs, {"span_labels": [torch.tensor([[0.3, 0.2]])]})
    assert losses["loss_label"].item() == pytest.approx(0.0476828, rel=1e-5)


# ---- span L1 / gIoU -------------------------------------------------------------------------------------
def test_span_losses_one_pair():
    # pred (0.55, 0.3) vs gt (0.5, 0.2): L1 = (0.05 + 0.1) / 2 = 0.075
    # xx: pred [0.4, 0.7], gt [0.4, 0.6]: inter 0.2, union 0.3, enclosing 0.3 -> giou 2/3 -> loss 1/3
    outputs = {"pred_logits": torch.zeros(1, 1, 2), "pred_spans": torch.tensor([[[0.55, 0.3]]])}
    losses = _criterion()(outputs, {"span_labels": [torch.tensor([[0.5, 0.2]])]})
    assert losses["loss_span"].item() == pytest.approx(0.075, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(1 / 3, rel=1e-5)


def test_span_loss_is_mean_over_all_pairs_of_batch():
    # sample 0: one target, matched pred off by 0.1 in center -> |errors| {0.1, 0}
    # sample 1: two targets matched exactly -> 4 zeros.  mean over 6 numbers = 0.1/6 (per-sample mean: 0.025)
    outputs = {"pred_logits": torch.zeros(2, 2, 2),
               "pred_spans": torch.tensor([[[0.4, 0.2], [0.9, 0.05]], [[0.2, 0.1], [0.7, 0.2]]])}
    targets = {"span_labels": [torch.tensor([[0.3, 0.2]]), torch.tensor([[0.7, 0.2], [0.2, 0.1]])]}
    losses = _criterion()(outputs, targets)
    assert losses["loss_span"].item() == pytest.approx(0.1 / 6, rel=1e-5)


# ---- saliency -------------------------------------------------------------------------------------------
def test_margin_loss_two_pairs():
    # row 0: s=[.5,.2,.4,.1], pos [0,1], neg [2,3]: .2+.4-.5 = .1 ; .2+.1-.2 = .1
    # row 1: s=[1,0,0,.3], pos [0,0], neg [3,1]: .2+.3-1 < 0 ; .2+0-1 < 0
    # 2 * (0.2) / (B*P = 4) = 0.1
    s = torch.tensor([[0.5, 0.2, 0.4, 0.1], [1.0, 0.0, 0.0, 0.3]])
    pos = torch.tensor([[0, 1], [0, 0]])
    neg = torch.tensor([[2, 3], [3, 1]])
    assert saliency_margin_loss(s, pos, neg, 0.2).item() == pytest.approx(0.1, rel=1e-5)


def _rac_official_loop(scores, mask, labels, tau=0.5):
    """The official CG-DETR/TR-DETR loop, skip rule included (spec §3)."""
    mask = mask.float()
    scores = mask * scores + (1.0 - mask) * -1e3
    total = 0.0
    for r in range(1, 12):
        drop_mask = ~(labels > 100)
        pos_mask = labels >= r
        if torch.sum(pos_mask) == 0:
            continue
        batch_drop_mask = torch.sum(pos_mask, dim=1) > 0
        cur = scores * drop_mask / tau + ~drop_mask * -1e3
        logits = cur - torch.max(cur, dim=1, keepdim=True)[0]
        log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True) + 1e-6)
        mean_log_prob_pos = (pos_mask * log_prob * mask).sum(1) / (pos_mask.sum(1) + 1e-6)
        total = total + (-mean_log_prob_pos * batch_drop_mask).mean()
    return total / 12


def test_rac_hand_value_and_masking():
    # s=[0,0], y=[1,0]: logp = -log(2 + 1e-6) for both; r=1: m = -0.693147/(1+1e-6); r>=2 has no positive.
    # RAC = 0.693147 / 12 = 0.0577622
    got = rank_contrastive_loss(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[1.0, 0.0]]))
    assert got.item() == pytest.approx(0.0577622, rel=1e-5)
    # a padded clip with a large score must not change it (it becomes -1000/tau before the softmax)
    got = rank_contrastive_loss(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([[True, True, False]]),
                                torch.tensor([[1.0, 0.0, 0.0]]))
    assert got.item() == pytest.approx(0.0577622, rel=1e-5)


def test_rac_equals_official_loop_with_skipped_ranks_and_padding():
    s = torch.tensor([[0.3, -1.2, 0.8, 2.0, 0.1, 0.0],
                      [1.5, 0.2, -0.3, 0.4, 0.9, -2.0],
                      [0.0, 0.5, 0.5, -0.5, 1.0, 0.7]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    # max label 5 -> ranks 6..11 have no positive anywhere (skipped by the official loop); row 2 has none at all;
    # row 0 has a positive label on a padded clip (counts in the denominator only, as in the official code).
    y = torch.tensor([[3.0, 0.0, 5.0, 1.0, 2.0, 0.0],
                      [0.0, 2.0, 0.0, 4.0, 1.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    want = _rac_official_loop(s, mask, y)
    got = rank_contrastive_loss(s, mask, y)
    assert float(want) > 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 7), st.integers(0, 12))
def test_rac_equals_official_loop_random(seed, bs, length, max_label):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(bs, length, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(bs, length, generator=g) > 0.2
    y = torch.randint(0, max_label + 1, (bs, length), generator=g).double()
    torch.testing.assert_close(rank_contrastive_loss(s, mask, y), torch.as_tensor(_rac_official_loop(s, mask, y),
                                                                                  dtype=torch.float64))


def test_rac_no_positive_in_batch_is_exactly_zero():
    got = rank_contrastive_loss(torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5))
    assert got.item() == 0.0


def test_rac_has_no_graph_break():
    # no data-dependent Python branch: dynamo must trace it as one graph
    fn = torch.compile(rank_contrastive_loss, backend="eager", fullgraph=True)
    s, mask, y = torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5)
    y[0, 1] = 3.0
    torch.testing.assert_close(fn(s, mask, y), _rac_official_loop(s, mask, y))


def test_loss_saliency_is_margin_plus_rac_hand_value():
    # L=2, s=[0,0], y=[1,0], pos=[0,0], neg=[1,1]: margin = 2 * (0.2 + 0.2) / (1*2) = 0.4; RAC = 0.0577622
    outputs = {"pred_logits": torch.zeros(1, 1, 2), "pred_spans": torch.tensor([[[0.5, 0.2]]]),
               "saliency_scores": torch.zeros(1, 2), "video_mask": torch.ones(1, 2, dtype=torch.bool)}
    targets = {"span_labels": [torch.tensor([[0.5, 0.2]])], "saliency_pos_labels": torch.tensor([[0, 0]]),
               "saliency_neg_labels": torch.tensor([[1, 1]]), "saliency_all_labels": torch.tensor([[1.0, 0.0]])}
    losses = _criterion()(outputs, targets)
    assert losses["loss_saliency"].item() == pytest.approx(0.4577622, rel=1e-5)


def test_saliency_skipped_without_labels():
    outputs, targets = _random_batch(aux=False)
    for k in ("saliency_pos_labels", "saliency_neg_labels", "saliency_all_labels"):
        del targets[k]
    assert "loss_saliency" not in _criterion()(outputs, targets)


# ---- criterion as a whole -------------------------------------------------------------------------------
def test_total_is_weighted_sum_and_aux_terms_present():
    outputs, targets = _random_batch()
    outputs["loss_align"] = torch.tensor(0.7)
    outputs["loss_sim"] = torch.tensor(-0.3)
    losses = _criterion()(outputs, targets)
    expected_keys = set(DEFAULT_WEIGHTS) | {"loss"}
    assert set(losses) == expected_keys
    want = sum(DEFAULT_WEIGHTS[k] * losses[k].item() for k in DEFAULT_WEIGHTS)
    assert losses["loss"].item() == pytest.approx(want, rel=1e-6)
    assert losses["loss_align"].item() == pytest.approx(0.7) and losses["loss_sim"].item() == pytest.approx(-0.3)


def test_aux_terms_match_a_separate_final_layer_run():
    outputs, targets = _random_batch()
    losses = _criterion()(outputs, targets)
    aux_as_final = {**outputs, **outputs["aux_outputs"][0]}
    del aux_as_final["aux_outputs"]
    ref = _criterion()(aux_as_final, targets)
    for k in ("loss_span", "loss_giou", "loss_label"):
        assert losses[f"{k}_0"].item() == pytest.approx(ref[k].item(), rel=1e-6)
    assert losses["loss_span_0"].item() != pytest.approx(losses["loss_span"].item())
    no_aux = _criterion(aux_loss=False)(outputs, targets)
    assert not any(k.endswith("_0") for k in no_aux)


def test_official_target_form_gives_same_result():
    outputs, targets = _random_batch()
    official = {**targets, "span_labels": [{"spans": t} for t in targets["span_labels"]]}
    a, b = _criterion()(outputs, targets), _criterion()(outputs, official)
    assert {k: v.item() for k, v in a.items()} == {k: v.item() for k, v in b.items()}


def test_zero_targets_in_whole_batch_no_nan_and_grads():
    outputs, targets = _random_batch(sizes=(0, 0, 0))
    losses = _criterion()(outputs, targets)
    assert losses["loss_span"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_span_0"].item() == 0.0
    assert all(torch.isfinite(v).all() for v in losses.values())
    losses["loss"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all() and outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_spans"].grad is not None and torch.isfinite(outputs["pred_spans"].grad).all()


def test_gradients_flow():
    outputs, targets = _random_batch()
    _criterion()(outputs, targets)["loss"].backward()
    for t in (outputs["pred_logits"], outputs["pred_spans"], outputs["saliency_scores"],
              outputs["aux_outputs"][0]["pred_logits"], outputs["aux_outputs"][0]["pred_spans"]):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_shape_mismatches_raise():
    outputs, targets = _random_batch()
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        _criterion()(outputs, {**targets, "span_labels": targets["span_labels"][:2]})
    with pytest.raises(ValueError, match=r"saliency_all_labels.*\(3, 8\).*\(3, 7\)"):
        _criterion()(outputs, {**targets, "saliency_all_labels": targets["saliency_all_labels"][:, :7]})
    with pytest.raises(ValueError, match=r"span_labels\[0\].*\(3,\)"):
        _criterion()(outputs, {**targets, "span_labels": [torch.zeros(3)] + targets["span_labels"][1:]})
    with pytest.raises(ValueError, match=r"saliency_pos_labels \(2, 2\)"):
        _criterion()(outputs, {**targets, "saliency_pos_labels": targets["saliency_pos_labels"][:2]})


# ---- builders -------------------------------------------------------------------------------------------
def test_build_weight_dict_defaults_and_presets():
    assert build_weight_dict(LDDETRConfig()) == DEFAULT_WEIGHTS
    wd = build_weight_dict(LDDETRConfig.preset("charades"))
    assert wd["loss_saliency"] == 1.5 and wd["loss_sim"] == 0.4
    wd = build_weight_dict(LDDETRConfig(num_decoder_layers=3))
    assert {"loss_span_1", "loss_giou_1", "loss_label_1"} <= set(wd) and "loss_span_2" not in wd
    assert not any(k.endswith("_0") for k in build_weight_dict(LDDETRConfig(aux_loss=False)))


def test_build_criterion_reads_config():
    crit = build_criterion(LDDETRConfig(saliency_margin=0.3, focal_alpha=0.5, focal_gamma=1.0,
                                        rac_temperature=0.7, set_cost_class=2.0))
    assert (crit.saliency_margin, crit.focal_alpha, crit.focal_gamma, crit.rac_temperature) == (0.3, 0.5, 1.0, 0.7)
    assert crit.matcher.cost_class == 2.0 and crit.aux_loss is True
    outputs, targets = _random_batch()
    assert torch.isfinite(crit(outputs, targets)["loss"])
