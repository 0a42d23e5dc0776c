"""The device matcher (reference.matcher.assign_min_cost / match_padded) against scipy's linear_sum_assignment."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from reference.matcher import HungarianMatcher, assign_min_cost, injective_map_table
from reference.span_utils import generalized_temporal_iou, paired_generalized_temporal_iou, span_cxw_to_xx


def _margins(costs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per problem: second-best minus best total over all distinct assignments of costs[i, :, :sizes[i]]
    (brute force over an independent itertools enumeration, vectorised per size; inf when there is one)."""
    n, q, _ = costs.shape
    out = np.full(n, np.inf)
    for k in np.unique(sizes).tolist():
        sel = np.nonzero(sizes == k)[0]
        if k == 0:
            continue
        c = costs[sel, :, :k]
        if q < k:  # all q queries are matched: enumerate injective maps of the queries into the targets
            c, q_, k_ = c.transpose(0, 2, 1), k, q
        else:
            q_, k_ = q, k
        maps = np.array(list(itertools.permutations(range(q_), k_)))  # (P, k_)
        totals = np.sort(c[:, maps, np.arange(k_)].sum(-1), axis=1)  # (n_k, P)
        if totals.shape[1] > 1:
            out[sel] = totals[:, 1] - totals[:, 0]
    return out


def _check_against_scipy(costs: torch.Tensor, sizes: torch.Tensor, width: int):
    """costs (N, Q, W), sizes (N,) real targets first; compares totals always, pairs when unique by 1e-4."""
    n, q, _ = costs.shape
    mask = torch.arange(width)[None] < sizes[:, None]
    idx, matched = assign_min_cost(costs[None], mask, injective_map_table(q, width))
    assert idx.shape == matched.shape == (1, n, width) and idx.dtype == torch.int64
    idx, matched = idx[0].numpy(), matched[0].numpy()
    c64 = costs.double().numpy()
    unique = _margins(c64, sizes.numpy()) >= 1e-4
    got_total = np.where(matched, np.take_along_axis(c64, idx[:, None, :], 1)[:, 0], 0).sum(1)  # (N,)
    compared = 0
    for i in range(n):
        k = int(sizes[i])
        rows, cols = linear_sum_assignment(c64[i, :, :k])
        assert matched[i].sum() == len(rows) == min(q, k)
        assert len(set(idx[i, matched[i]])) == len(rows)  # one query per target
        assert got_total[i] == pytest.approx(c64[i, rows, cols].sum(), abs=1e-9, rel=1e-9), i
        if unique[i]:
            compared += 1
            got = sorted((int(idx[i, j]), j) for j in range(width) if matched[i, j])
            assert got == sorted(zip(rows.tolist(), cols.tolist())), i
    return compared


def test_equals_scipy_on_10000_random_problems():
    """Q=10 queries, 0..5 targets padded to W=5; a fifth of the problems has many exact ties (costs rounded
    to 0.5), where only the total can be compared."""
    g = torch.Generator().manual_seed(0)
    n = 10_000
    costs = torch.randn(n, 10, 5, generator=g) * 3
    costs[: n // 5] = (costs[: n // 5] * 2).round() / 2
    sizes = torch.randint(0, 6, (n,), generator=g)
    compared = _check_against_scipy(costs, sizes, 5)
    assert compared > 7_000  # the unique-optimum comparisons really happened


@pytest.mark.parametrize("q,w", [(3, 5), (1, 3), (4, 4), (7, 2)])
def test_equals_scipy_with_fewer_queries_than_slots_and_other_shapes(q, w):
    g = torch.Generator().manual_seed(q * 10 + w)
    costs = torch.rand(500, q, w, generator=g) * 10 - 5  # negative costs too: dummy queries must not win
    sizes = torch.randint(0, w + 1, (500,), generator=g)
    _check_against_scipy(costs, sizes, w)


def test_padded_slots_anywhere_and_all_layers_in_one_call():
    """The mask may hold padding in any slot, and S sets are solved at once, each like alone."""
    g = torch.Generator().manual_seed(1)
    s, b, q, w = 3, 64, 10, 5
    costs = torch.randn(s, b, q, w, generator=g)
    mask = torch.rand(b, w, generator=g) > 0.4
    tables = injective_map_table(q, w)
    idx, matched = assign_min_cost(costs, mask, tables)
    for layer in range(s):
        one_idx, one_matched = assign_min_cost(costs[layer:layer + 1], mask, tables)
        assert torch.equal(one_idx[0], idx[layer]) and torch.equal(one_matched[0], matched[layer])
    for layer in range(s):
        for i in range(b):
            cols = mask[i].nonzero()[:, 0].numpy()
            rows, c = linear_sum_assignment(costs[layer, i][:, cols].double().numpy())
            assert sorted(zip(idx[layer, i, cols].tolist(), cols.tolist())) == sorted(zip(rows, cols[c]))
    assert not matched[:, ~mask].any()


def test_match_padded_equals_match_many_on_spans():
    """The whole device path (padded costs + assignment) against the official per-sample scipy path."""
    g = torch.Generator().manual_seed(2)
    matcher = HungarianMatcher(num_queries=10, max_targets=5)
    s, b, q = 2, 48, 10
    logits = torch.randn(s, b, q, 2, generator=g)
    spans = torch.rand(s, b, q, 2, generator=g) * 0.6 + 0.05
    sizes = torch.randint(0, 6, (b,), generator=g)
    tgt = torch.rand(b, 5, 2, generator=g) * 0.5 + 0.1
    mask = torch.arange(5)[None] < sizes[:, None]
    tgt = tgt * mask[..., None]  # zero padding, as the loader writes it
    idx, matched = matcher.match_padded(logits, spans, tgt, mask)
    lists = [tgt[i, : int(sizes[i])] for i in range(b)]
    many = matcher.match_many([{"pred_logits": logits[k], "pred_spans": spans[k]} for k in range(s)], lists)
    cost = torch.stack([matcher.cost({"pred_logits": logits[k], "pred_spans": spans[k]}, lists) for k in range(s)])
    offsets = np.cumsum([0] + sizes.tolist())
    for k in range(s):
        for i in range(b):
            got = sorted((int(idx[k, i, j]), j) for j in range(5) if matched[k, i, j])
            want = sorted(zip(many[k][i][0].tolist(), many[k][i][1].tolist()))
            c = cost[k, i, :, offsets[i]:offsets[i + 1]].double()
            assert sum(float(c[p, j]) for p, j in got) == pytest.approx(sum(float(c[p, j]) for p, j in want),
                                                                      abs=1e-5)
            if _margins(c.numpy()[None], np.array([c.shape[1]]))[0] >= 1e-4:
                assert got == want


def test_injective_map_table():
    maps, table = injective_map_table(10, 5)
    assert maps.shape == (30240, 5) and table.shape == (50, 30240) and table.dtype == torch.float64
    assert all(len(set(m)) == 5 for m in maps[::997].tolist())
    assert torch.equal(table.sum(0), torch.full((30240,), 5.0, dtype=torch.float64))
    assert len({tuple(m) for m in maps.tolist()}) == 30240
    maps, table = injective_map_table(2, 3)  # fewer queries than slots: a dummy query is added
    assert maps.shape == (6, 3)
    with pytest.raises(ValueError, match="matcher='scipy'"):
        injective_map_table(20, 5)


def test_paired_giou_equals_the_matrix_form():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(40, 2, generator=g, dtype=torch.float64)
    b = torch.rand(30, 2, generator=g, dtype=torch.float64)
    b[:5, 1] = 0  # zero-length spans
    want = generalized_temporal_iou(span_cxw_to_xx(a), span_cxw_to_xx(b))  # (40, 30)
    got = paired_generalized_temporal_iou(a[:, None], b[None])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="spans2"):
        paired_generalized_temporal_iou(a, torch.zeros(3, 3))


def test_matcher_moves_its_table_with_to():
    m = HungarianMatcher(num_queries=10, max_targets=5)
    assert m.map_table_5.shape == (50, 30240) and m.map_table_2.shape == (20, 90)
    assert not any("map" in k for k in m.state_dict())  # not checkpoint entries
    for w in range(1, 6):  # every width a batch may be padded to: no rebuild, no copy
        assert m._table(10, w, torch.device("cpu"))[1] is getattr(m, f"map_table_{w}")
    assert m._table(7, 3, torch.device("cpu"))[1].shape == (21, 210)  # another shape: built and cached
