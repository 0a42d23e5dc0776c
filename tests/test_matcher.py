"""Tests for reference/matcher.py: hand cases, brute force with an independent cost, batched == per-sample."""

import itertools
import math

import pytest
import torch

from reference.config import LDDETRConfig
from reference.matcher import HungarianMatcher, build_matcher


def _pairs(idx):
    src, tgt = idx
    assert src.dtype == tgt.dtype == torch.int64 and src.device.type == "cpu"
    return sorted(zip(src.tolist(), tgt.tolist()))


def test_obvious_assignment():
    # 3 queries, 2 targets: q2 sits exactly on t0 and q0 exactly on t1; q1 is a wide span in the middle.
    spans = torch.tensor([[[0.7, 0.2], [0.5, 0.5], [0.2, 0.2]]])
    logits = torch.zeros(1, 3, 2)  # equal class cost for every query
    targets = [torch.tensor([[0.2, 0.2], [0.7, 0.2]])]
    (idx,) = HungarianMatcher()({"pred_logits": logits, "pred_spans": spans}, targets)
    assert _pairs(idx) == [(0, 1), (2, 0)]
    assert idx[0].tolist() == [0, 2]  # pred indices in ascending order


def test_class_cost_can_decide():
    # target (0.5, 0.2) = xx [0.4, 0.6]; one target, 2 queries.
    # q0: span (0.52, 0.2) = xx [0.42, 0.62], fg prob 0.9 (logits [log 9, 0]);  q1: exact span, fg prob 0.1.
    # q0 costs: L1 = 0.02 -> 10*0.02 = 0.2; inter 0.18, union 0.22, enclosing 0.22 -> giou = 9/11 = 0.8182;
    #           class -0.9 -> 4*(-0.9) = -3.6. total 0.2 - 0.8182 - 3.6 = -4.218
    # q1 costs: 0 - 1 - 4*0.1 = -1.4                       -> q0 wins with the default weights
    # with cost_class = 0: q0 = -0.618, q1 = -1.0          -> q1 wins
    spans = torch.tensor([[[0.52, 0.2], [0.5, 0.2]]])
    logits = torch.tensor([[[math.log(9.0), 0.0], [0.0, math.log(9.0)]]])
    out = {"pred_logits": logits, "pred_spans": spans}
    targets = [torch.tensor([[0.5, 0.2]])]
    assert _pairs(HungarianMatcher()(out, targets)[0]) == [(0, 0)]
    assert _pairs(HungarianMatcher(cost_class=0.0)(out, targets)[0]) == [(1, 0)]


def _cost_py(logit, span, tgt, cc, cs, cg):
    """Cost of one (query, target) pair, written out in plain Python floats."""
    p_fg = math.exp(logit[0]) / (math.exp(logit[0]) + math.exp(logit[1]))
    l1 = abs(span[0] - tgt[0]) + abs(span[1] - tgt[1])
    a0, a1 = span[0] - span[1] / 2, span[0] + span[1] / 2
    b0, b1 = tgt[0] - tgt[1] / 2, tgt[0] + tgt[1] / 2
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = (a1 - a0) + (b1 - b0) - inter
    encl = max(a1, b1) - min(a0, b0)
    giou = inter / union - (encl - union) / encl
    return cs * l1 - cg * giou - cc * p_fg


@pytest.mark.parametrize("seed", range(5))
def test_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    q, n = 5, 3
    logits = torch.randn(1, q, 2, generator=g, dtype=torch.float64)
    spans = torch.rand(1, q, 2, generator=g, dtype=torch.float64) * 0.5 + 0.1
    tgt = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.1
    cc, cs, cg = 4.0, 10.0, 1.0
    cost = [[_cost_py(logits[0, i].tolist(), spans[0, i].tolist(), tgt[j].tolist(), cc, cs, cg) for j in range(n)]
            for i in range(q)]
    best = min(itertools.permutations(range(q), n), key=lambda perm: sum(cost[perm[j]][j] for j in range(n)))
    want = sorted((best[j], j) for j in range(n))
    got = HungarianMatcher(cc, cs, cg)({"pred_logits": logits, "pred_spans": spans}, [tgt])
    assert _pairs(got[0]) == want


def test_batched_equals_per_sample_with_empty_targets():
    g = torch.Generator().manual_seed(0)
    bs, q = 4, 6
    logits = torch.randn(bs, q, 2, generator=g)
    spans = torch.rand(bs, q, 2, generator=g) * 0.5 + 0.1
    sizes = [2, 0, 3, 1]
    targets = [torch.rand(n, 2, generator=g) * 0.5 + 0.1 for n in sizes]
    matcher = HungarianMatcher()
    batched = matcher({"pred_logits": logits, "pred_spans": spans}, targets)
    assert len(batched) == bs
    for b in range(bs):
        single = matcher({"pred_logits": logits[b:b + 1], "pred_spans": spans[b:b + 1]}, [targets[b]])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
        assert len(batched[b][0]) == sizes[b]
    assert batched[1][0].numel() == 0 and batched[1][0].dtype == torch.int64


def test_all_targets_empty():
    out = {"pred_logits": torch.randn(2, 3, 2), "pred_spans": torch.rand(2, 3, 2)}
    got = HungarianMatcher()(out, [torch.zeros(0, 2), torch.zeros(0, 2)])
    assert [(s.numel(), t.numel()) for s, t in got] == [(0, 0), (0, 0)]


def test_more_targets_than_queries_matches_every_query():
    out = {"pred_logits": torch.zeros(1, 2, 2), "pred_spans": torch.tensor([[[0.2, 0.1], [0.8, 0.1]]])}
    (idx,) = HungarianMatcher()(out, [torch.tensor([[0.8, 0.1], [0.5, 0.1], [0.2, 0.1]])])
    assert _pairs(idx) == [(0, 2), (1, 0)]


def test_bad_inputs_raise():
    out = {"pred_logits": torch.zeros(2, 3, 2), "pred_spans": torch.rand(2, 3, 2)}
    with pytest.raises(ValueError, match="1 span targets for a batch of 2"):
        HungarianMatcher()(out, [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match=r"span_targets\[1\].*\(3,\)"):
        HungarianMatcher()(out, [torch.zeros(1, 2), torch.zeros(3)])
    with pytest.raises(ValueError, match="pred_spans"):
        HungarianMatcher()({"pred_logits": torch.zeros(2, 3, 2), "pred_spans": torch.rand(2, 4, 2)}, [])


def test_build_matcher_reads_config():
    m = build_matcher(LDDETRConfig(set_cost_class=1.5, set_cost_span=2.5, set_cost_giou=3.5))
    assert (m.cost_class, m.cost_span, m.cost_giou) == (1.5, 2.5, 3.5)
    d = build_matcher(LDDETRConfig())
    assert (d.cost_class, d.cost_span, d.cost_giou) == (4.0, 10.0, 1.0)


def test_match_many_equals_one_call_per_set():
    """The criterion matches the final and aux layers in one call (one device->host transfer); each set's
    assignment must equal matching it alone, empty targets included."""
    matcher = HungarianMatcher()
    b, q = 4, 7
    targets = [torch.rand(n, 2) * 0.5 + 0.1 for n in (2, 0, 3, 1)]
    sets = [{"pred_logits": torch.randn(b, q, 2), "pred_spans": torch.rand(b, q, 2)} for _ in range(3)]
    many = matcher.match_many(sets, targets)
    assert len(many) == 3
    for out, got in zip(sets, many):
        want = matcher(out, targets)
        for (r1, c1), (r2, c2) in zip(got, want):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_non_finite_costs_raise():
    out = {"pred_logits": torch.randn(1, 3, 2), "pred_spans": torch.full((1, 3, 2), float("nan"))}
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher()(out, [torch.tensor([[0.5, 0.2]])])
