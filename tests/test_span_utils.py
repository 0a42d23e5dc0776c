"""Tests for reference/span_utils.py: format round-trip, IoU/gIoU against hand-computed values, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.span_utils import (
    generalized_temporal_iou,
    inverse_sigmoid,
    span_cxw_to_xx,
    span_xx_to_cxw,
    temporal_iou,
)

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, width=32)


def _xx_spans(n_min=1, n_max=6):
    """Valid (start, end) spans with end - start >= 0.01 (avoids the 0/0 of two zero-length spans)."""
    pair = st.tuples(unit, st.floats(min_value=0.01, max_value=1.0)).map(lambda p: [p[0], p[0] + p[1]])
    return st.lists(pair, min_size=n_min, max_size=n_max).map(lambda v: torch.tensor(v, dtype=torch.float64))


# ---- format conversion ----------------------------------------------------------------------------------
def test_cxw_to_xx_hand_values():
    # center 0.5, width 0.2 -> [0.4, 0.6]; center 0.1, width 0.4 -> [-0.1, 0.3]
    got = span_cxw_to_xx(torch.tensor([[0.5, 0.2], [0.1, 0.4]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[0.4, 0.6], [-0.1, 0.3]], dtype=torch.float64))
    # [0.2, 0.8] -> center 0.5, width 0.6
    got = span_xx_to_cxw(torch.tensor([0.2, 0.8], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.6], dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(unit, unit), min_size=1, max_size=12), st.integers(min_value=1, max_value=3))
def test_cxw_xx_round_trip(pairs, lead):
    spans = torch.tensor(pairs, dtype=torch.float64)
    spans = spans.expand(lead, *spans.shape).clone()  # any leading shape
    torch.testing.assert_close(span_xx_to_cxw(span_cxw_to_xx(spans)), spans)
    torch.testing.assert_close(span_cxw_to_xx(span_xx_to_cxw(spans)), spans)


@pytest.mark.parametrize("fn", [span_cxw_to_xx, span_xx_to_cxw])
def test_conversion_rejects_bad_last_dim(fn):
    with pytest.raises(ValueError, match=r"last dim 2.*\(4, 3\)"):
        fn(torch.zeros(4, 3))


# ---- IoU / gIoU -----------------------------------------------------------------------------------------
def test_iou_giou_hand_values():
    a = torch.tensor([[0.0, 2.0], [0.0, 1.0], [0.0, 4.0]])
    b = torch.tensor([[1.0, 3.0], [2.0, 4.0], [1.0, 2.0]])
    iou, union = temporal_iou(a, b)
    giou = generalized_temporal_iou(a, b)
    assert iou.shape == union.shape == giou.shape == (3, 3)
    # [0,2] vs [1,3]: inter 1, union 2+2-1 = 3 -> iou 1/3; enclosing [0,3] = 3 = union -> giou 1/3
    assert iou[0, 0].item() == pytest.approx(1 / 3)
    assert union[0, 0].item() == pytest.approx(3.0)
    assert giou[0, 0].item() == pytest.approx(1 / 3)
    # [0,1] vs [2,4]: inter 0, union 3 -> iou 0; enclosing [0,4] = 4 -> giou 0 - (4-3)/4 = -0.25
    assert iou[1, 1].item() == pytest.approx(0.0)
    assert giou[1, 1].item() == pytest.approx(-0.25)
    # [0,4] vs [1,2]: inter 1, union 4 -> iou 0.25; enclosing 4 -> giou 0.25
    assert iou[2, 2].item() == pytest.approx(0.25)
    assert giou[2, 2].item() == pytest.approx(0.25)
    # off-diagonal: [0,2] vs [2,4]: touching, inter 0, union 4, enclosing 4 -> iou 0, giou 0
    assert iou[0, 1].item() == pytest.approx(0.0)
    assert giou[0, 1].item() == pytest.approx(0.0)
    # [0,1] vs [1,3]: inter 0, union 3, enclosing 3 -> giou 0;  [0,1] vs [1,2]: union 2, enclosing 2 -> 0
    assert giou[1, 0].item() == pytest.approx(0.0)
    # [0,4] vs [2,4]: inter 2, union 4 -> 0.5
    assert iou[2, 1].item() == pytest.approx(0.5)


def test_giou_far_apart_tends_to_minus_one():
    # [0, 0.01] vs [0.99, 1]: union 0.02, enclosing 1 -> giou = -(1 - 0.02)/1 = -0.98
    giou = generalized_temporal_iou(torch.tensor([[0.0, 0.01]]), torch.tensor([[0.99, 1.0]]))
    assert giou.item() == pytest.approx(-0.98, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(_xx_spans(), _xx_spans())
def test_giou_properties(a, b):
    iou, _ = temporal_iou(a, b)
    giou = generalized_temporal_iou(a, b)
    assert (giou <= iou + 1e-12).all()
    assert (giou >= -1 - 1e-12).all() and (iou <= 1 + 1e-12).all() and (iou >= 0).all()
    torch.testing.assert_close(generalized_temporal_iou(b, a), giou.T)  # symmetric
    self_giou = torch.diag(generalized_temporal_iou(a, a))
    torch.testing.assert_close(self_giou, torch.ones_like(self_giou))


def test_iou_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"spans1.*\(2, 3\)"):
        temporal_iou(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"spans2.*\(2,\)"):
        generalized_temporal_iou(torch.zeros(2, 2), torch.zeros(2))


# ---- inverse sigmoid ------------------------------------------------------------------------------------
def test_inverse_sigmoid_values():
    x = torch.tensor([0.5, 0.25, 0.0, 1.0, -3.0, 7.0], dtype=torch.float64)
    got = inverse_sigmoid(x)
    # 0.5 -> log(1) = 0; 0.25 -> log(0.25/0.75) = -log 3; 0 -> log(1e-3/1); 1 -> log(1/1e-3); out-of-range clamp
    want = torch.tensor([0.0, -math.log(3), math.log(1e-3), -math.log(1e-3), math.log(1e-3), -math.log(1e-3)],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want)


@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=0.002, max_value=0.998))
def test_inverse_sigmoid_inverts_sigmoid(p):
    x = torch.tensor([p], dtype=torch.float64)
    torch.testing.assert_close(torch.sigmoid(inverse_sigmoid(x)), x)
