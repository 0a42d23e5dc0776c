"""Tests for engine/evaluate.py: shipped QVHighlights metrics (every key), hand-computed MR / HL / Charades /
TVSum cases, naive transcriptions of the upstream loops, bad-input errors, and the CLI end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.evaluate import (
    evaluate,
    evaluate_charades_tacos,
    evaluate_qvhighlights,
    evaluate_tvsum,
    hl_average_precision,
    load_jsonl,
    mr_average_precision,
    save_json,
    top_k_trapezoid_ap,
)

REPO = Path(__file__).resolve().parents[1]
QVH = Path(__file__).resolve().parents[2] / "shared" / "data" / "qvhighlights"
needs_data = pytest.mark.skipif(not QVH.is_dir(), reason=f"shared data folder absent: {QVH}")
THDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _fixture_pairs():
    if not QVH.is_dir():
        return []
    pairs = [("sample_val_preds.jsonl", "sample_val_preds_metrics_raw.json")]
    for preds in sorted((QVH / "extra_fixtures").glob("*_preds.jsonl")):
        pairs.append((f"extra_fixtures/{preds.name}", f"extra_fixtures/{preds.stem}_metrics.json"))
    return pairs


# ---- shipped metrics ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qvh_val_gt():
    return load_jsonl(QVH / "highlight_val_release.jsonl")


@needs_data
def test_all_fixture_pairs_found():
    names = [p for p, _ in _fixture_pairs()]
    assert len(names) >= 4 and any("cgdetr" in n for n in names), names


@needs_data
@pytest.mark.parametrize("preds_name, metrics_name", _fixture_pairs())
def test_matches_shipped_metrics(preds_name, metrics_name, qvh_val_gt):
    expected = json.loads((QVH / metrics_name).read_text())
    # CG-DETR's evaluator is the one writing MR-full-mIoU (spec §3); the cgdetr fixture must be that variant
    variant = "cgdetr" if "MR-full-mIoU" in expected["brief"] else "official"
    assert (variant == "cgdetr") == ("cgdetr" in preds_name)
    got = evaluate_qvhighlights(load_jsonl(QVH / preds_name), qvh_val_gt, variant=variant)
    exp_flat, got_flat = dict(_flat(expected)), dict(_flat(got))
    assert list(got_flat) == list(exp_flat)  # same keys, same order (spec §2.6)
    diffs = {k: (got_flat[k], v) for k, v in exp_flat.items() if round(got_flat[k], 2) != round(v, 2)}
    assert not diffs, f"{preds_name}: (got, shipped) differ at {diffs}"


@needs_data
def test_official_variant_has_no_extended_keys(qvh_val_gt):
    sub = load_jsonl(QVH / "extra_fixtures" / "cgdetr_val_preds.jsonl")
    got = evaluate_qvhighlights(sub, qvh_val_gt)  # official evaluator on CG-DETR predictions
    assert "MR-full-mIoU" not in got["brief"] and "MR-mIoU" not in got["full"]
    assert list(got["full"]["MR-R1"]) == [str(t) for t in THDS]
    expected = json.loads((QVH / "extra_fixtures" / "cgdetr_val_preds_metrics.json").read_text())
    assert got["full"]["MR-mAP"] == expected["full"]["MR-mAP"]


# ---- moment retrieval, by hand ------------------------------------------------------------------------------
def _mr_case():
    gt = [
        {"qid": 1, "duration": 150, "relevant_windows": [[0, 10]]},
        {"qid": 2, "duration": 150, "relevant_windows": [[0, 10], [20, 30]]},
        {"qid": 3, "duration": 150, "relevant_windows": [[40, 60]]},
    ]
    sub = [
        {"qid": 1, "pred_relevant_windows": [[0, 10, 0.9], [20, 30, 0.8]]},
        {"qid": 2, "pred_relevant_windows": [[20, 28, 0.9], [0, 10, 0.5], [0, 20, 0.3]]},
        # listed out of score order: R1 takes the first listed window, mAP re-sorts by score
        {"qid": 3, "pred_relevant_windows": [[0, 10, 0.5], [40, 60, 0.8]]},
    ]
    return sub, gt


def test_mr_hand_computed():
    sub, gt = _mr_case()
    m = evaluate_qvhighlights(sub, gt)
    # R1 (top-1 = first listed): q1 IoU 1; q2 [20,28] best GT [20,30] IoU 8/10 = 0.8; q3 [0,10] IoU 0.
    #   t <= 0.8: 2/3 = 66.67; t >= 0.85: 1/3 = 33.33
    assert m["full"]["MR-R1"] == {str(t): (66.67 if t <= 0.8 else 33.33) for t in THDS}
    # AP q1: TP, FP -> prec [1, .5], rec [1, 1] -> 1.
    # AP q2: [20,28] IoU .8 with GT2 (TP iff t <= .8); [0,10] TP on GT1; [0,20] IoU .5 with GT1 (locked) -> FP.
    #   t <= .8: prec [1, 1, 2/3], rec [.5, 1, 1] -> .5*1 + .5*1 = 1
    #   t > .8 : tp [0,1,0], prec [0, .5, 1/3], rec [0, .5, .5] -> .5 * interp(.5) = .25
    # AP q3: sorted by score [40,60] TP then [0,10] FP -> 1.
    # mAP@t<=.8 = 1 -> 100; mAP@t>.8 = (1 + .25 + 1)/3 = .75 -> 75; average = (7*1 + 3*.75)/10 = 92.5
    assert m["full"]["MR-mAP"] == {**{str(t): (100.0 if t <= 0.8 else 75.0) for t in THDS}, "average": 92.5}
    # splits: q1 and q2 have only 10-s windows (short), q3 a 20-s window (middle); long is empty -> zeros.
    #   short mAP = (7 * 1 + 3 * (1 + .25)/2) / 10 = .8875 -> 88.75
    assert m["short"]["MR-R1"]["0.5"] == 100.0 and m["short"]["MR-mAP"]["average"] == 88.75
    assert m["middle"]["MR-R1"]["0.5"] == 0.0 and m["middle"]["MR-mAP"]["average"] == 100.0
    assert m["long"]["MR-mAP"]["average"] == 0.0
    assert list(m) == ["brief", "full", "long", "middle", "short"]  # no HL block without saliency
    assert m["brief"] == {
        "MR-full-R1@0.5": 66.67, "MR-full-R1@0.7": 66.67, "MR-full-mAP": 92.5, "MR-full-mAP@0.5": 100.0,
        "MR-full-mAP@0.75": 100.0, "MR-long-mAP": 0.0, "MR-middle-mAP": 100.0, "MR-short-mAP": 88.75,
    }


def test_mr_ap_false_positive_first_and_duplicates():
    gt = np.array([[0.0, 10.0]])
    # FP then TP: prec [0, .5], rec [0, 1] -> interpolated precision .5 over recall 0..1 -> .5
    ap = mr_average_precision(np.array([[50, 60, 0.9], [0, 10, 0.8]], float), gt, THDS)
    np.testing.assert_allclose(ap, 0.5)
    # a duplicate of a matched moment is a FP: TP, FP -> 1; then a lower-ranked FP changes nothing
    ap = mr_average_precision(np.array([[0, 10, 0.9], [0, 10, 0.8], [1, 9, 0.7]], float), gt, THDS)
    np.testing.assert_allclose(ap, 1.0)


def test_mr_only_first_ten_windows_count():
    gt = [{"qid": 0, "relevant_windows": [[100, 120]]}]
    wrong = [[0, 2, 0.5]] * 10
    m = evaluate_qvhighlights([{"qid": 0, "pred_relevant_windows": wrong + [[100, 120, 0.99]]}], gt)
    assert m["full"]["MR-mAP"]["average"] == 0.0  # the 11th window is cut BEFORE sorting (spec §2.4)
    m = evaluate_qvhighlights([{"qid": 0, "pred_relevant_windows": wrong[:9] + [[100, 120, 0.99]]}], gt)
    assert m["full"]["MR-mAP"]["average"] == 100.0


def test_empty_prediction_list_is_r1_miss_and_dropped_from_map():
    gt = [{"qid": 0, "relevant_windows": [[0, 10]]}, {"qid": 1, "relevant_windows": [[0, 10]]}]
    sub = [{"qid": 0, "pred_relevant_windows": [[0, 10, 1.0]]}, {"qid": 1, "pred_relevant_windows": []}]
    m = evaluate_qvhighlights(sub, gt)
    assert m["full"]["MR-R1"]["0.5"] == 50.0 and m["full"]["MR-mAP"]["average"] == 100.0


# ---- highlight detection, by hand ---------------------------------------------------------------------------
def _hl_case():
    gt = [
        # 4 clips; full GT rows: c0 [0,0,0], c1 [4,2,0], c2 [3,3,1], c3 [0,0,0]
        {"qid": "a", "duration": 8, "relevant_windows": [[2, 6]], "relevant_clip_ids": [1, 2],
         "saliency_scores": [[4, 2, 0], [3, 3, 1]]},
        {"qid": "b", "duration": 4, "relevant_windows": [[0, 2]], "relevant_clip_ids": [0],
         "saliency_scores": [[4, 4, 4]]},
        {"qid": "c", "duration": 4, "relevant_windows": [[0, 2]], "relevant_clip_ids": [0],
         "saliency_scores": [[4, 4, 4]]},
    ]
    sub = [
        {"qid": "a", "pred_saliency_scores": [0.1, 0.9, 0.5, 0.5]},
        {"qid": "b", "pred_saliency_scores": [-1.0]},  # one short -> padded with 0.0: [-1, 0]
        {"qid": "c", "pred_saliency_scores": [0.1, 0.2, 0.9]},  # one long -> truncated; arg-max clip 2 >= 2
    ]
    return sub, gt


def test_hl_hand_computed():
    sub, gt = _hl_case()
    m = evaluate_qvhighlights(sub, gt)
    # q a, order c1 (.9) | {c2, c3} (.5, tied) | c0: groups cover 1, 3, 4 clips.
    #   labels [0,1,1,0] -> tp 1,2,2 prec 1, 2/3, 1/2 -> AP mean(1, 2/3) = 5/6
    #   labels [0,0,1,0] -> tp 0,1,1 prec 0, 1/3, 1/4 -> AP 1/3;  [0,1,0,0] -> AP 1;  all-zero -> AP 0
    #   Fair (>=2): [5/6, 5/6, 0]; Good (>=3): [5/6, 1/3, 0]; VeryGood (>=4): [1, 0, 0]
    # q b: padded [-1, 0.0] ranks c1 (negative) first -> prec 0, 1/2 -> AP 1/2 for all 9 columns
    # q c: truncated [.1, .2] -> the same, AP 1/2
    # Fair = (5/3 + 3)/9 = 14/27 = .5185; Good = (7/6 + 3)/9 = 25/54 = .4630; VeryGood = (1 + 3)/9 = .4444
    # HIT@1: q a arg-max c1 -> positive for some annotator at every level; q b arg-max over the raw list = c0
    #   -> 1; q c arg-max = index 2 >= 2 clips -> 0.  -> 2/3
    assert m["brief"] == {
        "HL-min-Fair-mAP": 51.85, "HL-min-Fair-Hit1": 66.67, "HL-min-Good-mAP": 46.3, "HL-min-Good-Hit1": 66.67,
        "HL-min-VeryGood-mAP": 44.44, "HL-min-VeryGood-Hit1": 66.67,
    }
    assert list(m) == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood"]
    assert m["HL-min-Good"] == {"HL-mAP": 46.3, "HL-Hit1": 66.67}


def test_hl_all_positive_column_is_one():
    np.testing.assert_allclose(hl_average_precision(np.array([0.3, 0.1, 0.2]), np.ones((3, 1), bool)), [1.0])


# ---- naive transcriptions of the upstream loops (spec §2.4, §2.5) --------------------------------------------
def _naive_mr_ap(pred, gt, thds):
    """Loop-for-loop transcription of the official ``compute_average_precision_detection``."""
    pred = sorted(pred, key=lambda p: -p[2])
    tp = np.zeros((len(thds), len(pred)))
    fp = np.zeros((len(thds), len(pred)))
    lock = -np.ones((len(thds), len(gt)))
    for i, (s, e, _) in enumerate(pred):
        ious = []
        for gs, ge in gt:
            inter = max(0.0, min(e, ge) - max(s, gs))
            union = (e - s) + (ge - gs) - inter
            ious.append(inter / union if union > 0 else 0.0)
        ious = np.array(ious)
        for t, thd in enumerate(thds):
            for j in np.argsort(ious, kind="stable")[::-1]:
                if ious[j] < thd:
                    fp[t, i] = 1
                    break
                if lock[t, j] >= 0:
                    continue
                tp[t, i] = 1
                lock[t, j] = i
                break
            if tp[t, i] == 0 and fp[t, i] == 0:
                fp[t, i] = 1
    tpc, fpc = np.cumsum(tp, 1), np.cumsum(fp, 1)
    out = []
    for t in range(len(thds)):
        prec = np.hstack([[0], tpc[t] / (tpc[t] + fpc[t]), [0]])
        rec = np.hstack([[0], tpc[t] / len(gt), [1]])
        for i in range(len(prec) - 1)[::-1]:
            prec[i] = max(prec[i], prec[i + 1])
        idx = np.where(rec[1:] != rec[:-1])[0] + 1
        out.append(np.sum((rec[idx] - rec[idx - 1]) * prec[idx]))
    return np.array(out)


def _naive_hl_ap(y_true, y_pred):
    """video2gif ``get_ap(interpolate=True)`` over a hand-written ``precision_recall_curve``."""
    if len(set(y_true)) == 1:
        return float(y_true[0] != 0)
    points = []  # (precision, recall) per distinct threshold, ascending threshold (sklearn order)
    for thr in sorted(set(y_pred)):
        sel = [t for t, p in zip(y_true, y_pred) if p >= thr]
        points.append((sum(sel) / len(sel), sum(sel) / sum(y_true)))
    points.append((1.0, 0.0))
    prec = [p for p, _ in points]
    rec = np.array([r for _, r in points], dtype=np.float32)
    for i in range(1, len(prec)):
        prec[i] = max(prec[i - 1], prec[i])
    return float(np.mean(np.array(prec)[np.where(np.diff(rec))]))


small_int = st.integers(0, 12)
win = st.tuples(small_int, st.integers(1, 8)).map(lambda p: (float(p[0]), float(p[0] + p[1])))
pred_win = st.tuples(small_int, st.integers(0, 8), st.sampled_from([0.1, 0.5, 0.9])).map(
    lambda p: (float(p[0]), float(p[0] + p[1]), p[2]))


@settings(max_examples=150, deadline=None)
@given(st.lists(pred_win, min_size=1, max_size=10), st.lists(win, min_size=1, max_size=4))
def test_mr_ap_matches_naive_transcription(pred, gt):
    got = mr_average_precision(np.array(pred, float), np.array(gt, float), THDS)
    np.testing.assert_allclose(got, _naive_mr_ap(pred, gt, THDS), atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([-1.0, 0.0, 0.25, 0.5, 2.0])), min_size=1, max_size=12))
def test_hl_ap_matches_naive_transcription(rows):
    y = [r[0] for r in rows]
    s = [r[1] for r in rows]
    got = hl_average_precision(np.array(s), np.array(y, bool)[:, None])[0]
    assert math.isclose(got, _naive_hl_ap(y, s), abs_tol=1e-12)


# ---- Charades-STA / TACoS -------------------------------------------------------------------------------------
def test_charades_tacos_hand_computed():
    gt = [{"qid": "s1_0", "duration": 30.0, "relevant_windows": [[0.0, 10.0]]},
          {"qid": "s1_1", "duration": 30.0, "relevant_windows": [[10.0, 20.0]]}]
    sub = [{"qid": "s1_0", "pred_relevant_windows": [[0.0, 5.0, 0.9]]},
           {"qid": "s1_1", "pred_relevant_windows": [[12.0, 20.0, 0.8], [0.0, 4.0, 0.1]]}]
    # IoUs of the top-1: 5/10 = .5 and 8/10 = .8 -> R1@.3 = R1@.5 = 100 (inclusive), R1@.7 = 50, mIoU = 65
    # mAP@.75: q0 AP 0 (IoU .5 < .75), q1 AP 1 -> 50;  mAP@.5 = 100
    m = evaluate_charades_tacos(sub, gt)
    b = m["brief"]
    assert (b["MR-full-R1@0.3"], b["MR-full-R1@0.5"], b["MR-full-R1@0.7"], b["MR-full-mIoU"]) == (100.0, 100.0, 50.0, 65.0)
    assert (b["MR-full-mAP@0.5"], b["MR-full-mAP@0.75"]) == (100.0, 50.0)
    assert list(b) == sorted(b) and list(m["full"]) == ["MR-mIoU", "MR-mAP", "MR-R1"]
    assert list(m["full"]["MR-R1"])[:4] == ["0.3", "0.35", "0.4", "0.45"]
    assert m["long"]["MR-mIoU"] == 0.0  # empty split -> zeros
    assert evaluate(sub, gt, dataset="tacos") == m == evaluate(sub, gt, dataset="charades")


# ---- TVSum ----------------------------------------------------------------------------------------------------
def _tvsum_case():
    gt = [
        # a: [1,2,3,4,5,5] lower median 3 -> [0,0,0,1,1,1];  b: [5,1,1,1,1,2] lower median 1 -> [1,0,0,0,0,1]
        {"qid": "v1", "domain": "BK", "label": [[1, 5], [2, 1], [3, 1], [4, 1], [5, 1], [5, 2]]},
        # [1,1,1,1,1,5] -> only the last clip is positive, and it is ranked last -> AP 0
        {"qid": "v2", "domain": "VU", "label": [[1, 1], [1, 1], [1, 1], [1, 1], [1, 1], [5, 5]]},
    ]
    sub = [{"qid": "v1", "pred_saliency_scores": [0.6, 0.5, 0.4, 0.9, 0.1, 0.8]},
           {"qid": "v2", "pred_saliency_scores": [6, 5, 4, 3, 2, 1]}]
    return sub, gt


def test_tvsum_hand_computed():
    sub, gt = _tvsum_case()
    # v1 ranking c3, c5, c0, c1, c2 | c4.  a top-5 labels [1,1,0,0,0]: AP = .5*(1+1)/2 + .5*(1+1)/2 = 1
    # b top-5 [0,1,1,0,0]: AP = 0 + .5*(0+.5)/2 + .5*(.5+2/3)/2 = .125 + .29167 = .41667
    # BK = (1 + .41667)/2 = .70833 -> 70.83; VU = 0; mean over domains = .35417 -> 35.42
    m = evaluate_tvsum(sub, gt)
    assert m["brief"] == {"HL-Top5-mAP": 35.42, "HL-BK-Top5-mAP": 70.83, "HL-VU-Top5-mAP": 0.0}
    assert m["per_domain"]["BK"] == {"Top5-mAP": 70.83, "num_videos": 1}
    assert evaluate(sub, gt, dataset="tvsum") == m
    # all clips ranked (top_k=None), column a: labels [1,1,0,0,0,1], 3 positives:
    #   1/3*(1+1)/2 + 1/3*(1+1)/2 + 1/3*(.4+.5)/2 = 1/3 + 1/3 + .15 = .81667
    a = top_k_trapezoid_ap(np.array([0.6, 0.5, 0.4, 0.9, 0.1, 0.8]), np.array([[0, 0, 0, 1, 1, 1]], bool).T, None)
    np.testing.assert_allclose(a, [2 / 3 + 0.15], atol=1e-12)


def test_tvsum_matches_upstream_loop():
    """The QD-DETR / CG-DETR / lighthouse loop, transcribed with torch (median, descending argsort)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    gt, sub, expected = [], [], []
    for v in range(6):
        n = int(rng.integers(6, 40))
        label = rng.integers(1, 6, size=(n, 20)).astype(float)
        pred = rng.permutation(n).astype(float)  # distinct scores: torch's unstable sort cannot differ
        gt.append({"qid": f"v{v}", "domain": "BK", "label": label.tolist()})
        sub.append({"qid": f"v{v}", "pred_saliency_scores": pred.tolist()})
        for i in range(20):
            inds = torch.argsort(torch.tensor(pred), descending=True)
            cur = torch.tensor(label)[:, i]
            cur = torch.where(cur > cur.median(), 1.0, 0.0)[inds].tolist()[:5]
            if sum(cur) == 0:
                expected.append(0.0)
                continue
            hits = ap = rec = 0.0
            prc = 1.0
            for j, g in enumerate(cur):
                hits += g
                _rec, _prc = hits / sum(cur), hits / (j + 1)
                ap += (_rec - rec) * (prc + _prc) / 2
                rec, prc = _rec, _prc
            expected.append(ap)
    assert evaluate_tvsum(sub, gt)["brief"]["HL-Top5-mAP"] == float(f"{100 * np.mean(expected):.2f}")


# ---- bad input -----------------------------------------------------------------------------------------------
def test_duplicate_qid_in_submission_and_gt():
    sub, gt = _mr_case()
    with pytest.raises(ValueError, match=r"duplicate qid 2 in submission"):
        evaluate_qvhighlights(sub + [sub[1]], gt)
    with pytest.raises(ValueError, match=r"duplicate qid 3 in ground truth"):
        evaluate_qvhighlights(sub, gt + [gt[2]])


def test_qid_mismatch_names_qids():
    sub, gt = _mr_case()
    with pytest.raises(ValueError, match=r"1 qid\(s\) missing from the submission \[2\]"):
        evaluate_qvhighlights([sub[0], sub[2]], gt)
    extra = {"qid": 99, "pred_relevant_windows": [[0, 1, 1.0]]}
    with pytest.raises(ValueError, match=r"1 extra qid\(s\) not in the ground truth \[99\]"):
        evaluate_qvhighlights(sub + [extra], gt)
    m = evaluate_qvhighlights([sub[0], sub[2], extra], gt, match_number=False)  # intersection: q1 and q3
    assert m["full"]["MR-R1"]["0.5"] == 50.0


@pytest.mark.parametrize("window", [[10, 5, 0.9], [1, 2], [0, float("nan"), 0.5], [0, 1, float("inf")], ["a", 1, 2]])
def test_malformed_window_names_qid(window):
    sub, gt = _mr_case()
    sub[2] = {"qid": 3, "pred_relevant_windows": [[40, 60, 0.8], window]}
    with pytest.raises(ValueError, match=r"qid 3"):
        evaluate_qvhighlights(sub, gt)


def test_ragged_windows_and_missing_key_name_qid():
    sub, gt = _mr_case()
    bad = [dict(sub[0]), {"qid": 2, "pred_relevant_windows": [[0, 1, 0.5], [0, 1]]}, sub[2]]
    with pytest.raises(ValueError, match=r"qid 2: 'pred_relevant_windows'"):
        evaluate_qvhighlights(bad, gt)
    with pytest.raises(ValueError, match=r"qid 3: submission record lacks 'pred_relevant_windows'"):
        evaluate_qvhighlights([sub[0], sub[1], {"qid": 3}], gt)
    with pytest.raises(ValueError, match=r"ground truth qid 2 has no relevant_windows"):
        evaluate_qvhighlights(sub, [gt[0], {"qid": 2, "relevant_windows": []}, gt[2]])


def test_saliency_length_mismatch_names_qid():
    sub, gt = _hl_case()
    sub[0] = {"qid": "a", "pred_saliency_scores": [0.1, 0.2]}  # 2 scores for 4 clips
    with pytest.raises(ValueError, match=r"qid 'a': pred_saliency_scores has 2 scores.*4 clips"):
        evaluate_qvhighlights(sub, gt, strict=True)
    sub[0] = {"qid": "a", "pred_saliency_scores": [0.1, float("nan"), 0.3, 0.4]}
    with pytest.raises(ValueError, match=r"qid 'a'"):
        evaluate_qvhighlights(sub, gt)


def test_unknown_dataset_and_variant():
    sub, gt = _mr_case()
    with pytest.raises(ValueError, match=r"did you mean 'tacos'"):
        evaluate(sub, gt, dataset="taco")
    with pytest.raises(ValueError, match=r"unknown variant"):
        evaluate_qvhighlights(sub, gt, variant="umt")


# ---- I/O and CLI ---------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "engine.evaluate", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_save_json_atomic(tmp_path):
    out = tmp_path / "m.json"
    save_json({"a": 1.5}, out)
    assert json.loads(out.read_text()) == {"a": 1.5} and os.listdir(tmp_path) == ["m.json"]
    with pytest.raises(TypeError):
        save_json({"a": object()}, out)  # not serialisable: the old file survives, no temp file is left
    assert json.loads(out.read_text()) == {"a": 1.5} and os.listdir(tmp_path) == ["m.json"]


def test_load_jsonl_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"qid": 1}\n\n{"qid": 2,\n')
    with pytest.raises(ValueError, match=r"x.jsonl:3: invalid JSON"):
        load_jsonl(p)


def test_cli_end_to_end(tmp_path):
    sub, gt = _mr_case()
    sp, gp, out = _write_jsonl(tmp_path / "s.jsonl", sub), _write_jsonl(tmp_path / "g.jsonl", gt), tmp_path / "o" / "m.json"
    r = _cli("--submission", sp, "--ann", gp, "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == evaluate_qvhighlights(sub, gt)["brief"]
    assert json.loads(out.read_text()) == evaluate_qvhighlights(sub, gt)

    out.write_text("old")  # a failing run must leave an existing --out untouched, with no temp file around
    _write_jsonl(sp, sub[:2])
    r = _cli("--submission", sp, "--ann", gp, "--out", out)
    assert r.returncode == 2 and "missing from the submission [3]" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert out.read_text() == "old" and os.listdir(out.parent) == ["m.json"]

    r = _cli("--submission", tmp_path / "nope.jsonl", "--gt", gp, "--out", tmp_path / "new.json")
    assert r.returncode == 2 and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "new.json").exists()

    sp.write_text(json.dumps(sub[0]) + "\n{oops\n")
    r = _cli("--submission", sp, "--gt", gp)
    assert r.returncode == 2 and "s.jsonl:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr


@needs_data
def test_cli_sample_matches_shipped_file(tmp_path):
    out = tmp_path / "metrics.json"
    r = _cli("--submission", QVH / "sample_val_preds.jsonl", "--gt", QVH / "highlight_val_release.jsonl",
             "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == (QVH / "sample_val_preds_metrics_raw.json").read_text().rstrip("\n")
