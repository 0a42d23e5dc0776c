"""Moment-retrieval / highlight-detection metrics: QVHighlights, Charades-STA, TACoS, TVSum (numpy only).

Spec: ``shared/spec/evaluation.md``. Section numbers below refer to it.

* §1 input formats and the qid check: with ``match_number=True`` the submission's qid set must equal the
  ground truth's, otherwise both sides are intersected. The MR block is computed only if the *first*
  submission record has ``pred_relevant_windows``, the HL block only if it has ``pred_saliency_scores``.
* §2.1 temporal IoU (true union, 0/0 -> 0; the R1 pair uses the hull, identical whenever it matters).
* §2.2 length splits on GT window length: short (0, 10], middle (10, 30], long (30, 150], full = no filter.
  Predictions are never filtered.
* §2.3 MR-R1@t: the first listed window is the top-1 (no re-sorting); the best-IoU GT window (first on
  ties); hit iff IoU >= t.
* §2.4 MR-mAP@t: first 10 listed windows, stable sort by score, greedy one-to-one matching per threshold,
  VOC-2011 all-point interpolated AP per query; mean over queries (queries with no window are dropped),
  ``average`` = mean over the 10 thresholds 0.50:0.05:0.95.
* §2.5 HL: ``int(duration / 2)`` clips, unlabeled clips score 0, "score >= 2/3/4" = Fair/Good/VeryGood per
  annotator; predictions truncated / right-padded with 0.0; AP = mean interpolated precision over distinct
  recall levels (ties grouped), 0 if no positive, 1 if all positive; HIT@1 = any annotator positive at the
  arg-max clip. HL-mAP = mean over (query, annotator) pairs.
* §2.6 output layout: ``"brief"`` first, then the other keys sorted; brief MR keys ASCII-sorted, HL keys in
  Fair/Good/VeryGood x (mAP, Hit1) order.
* §3 variants: ``variant="cgdetr"`` (CG-DETR ``standalone_eval/eval.py``) adds R1 at 0.30..0.45 (14
  thresholds in all), ``MR-mIoU`` per split (mean top-1 paired IoU) and brief keys ``MR-full-R1@0.3``,
  ``MR-full-mIoU``. Charades-STA / TACoS use that variant (MR only). TVSum: per (video, annotator) binarise
  ``score > lower median``, rank clips by predicted saliency, top-5 trapezoid AP with recall normalised by
  the positives inside the top 5; mean over annotators and videos per domain, then over domains.

Rounding / averaging: every reported number is ``100 * value`` formatted with ``f"{x:.2f}"`` and converted
back to float (so ``32.2``, not ``32.20``), applied only at the end of each metric; all averages are
taken over unrounded values (brief values are copies of the rounded per-split values, as upstream).

Departures from the upstream scripts (none changes a number on well-formed input):

* Bad input raises ``ValueError`` naming the qid (duplicate qids, qid mismatch, malformed / non-finite
  windows, ``start > end``, GT without windows) instead of an ``assert`` or a crash deep inside numpy.
* Saliency lists of any length are padded with 0.0 / truncated as upstream does (§2.5), and an
  :class:`EvaluationNote` warning says how many queries were padded / truncated; ``strict=True`` refuses a
  list more than ``SALIENCY_LEN_TOLERANCE`` clips off (the shipped val files are one short on 13 queries).
* When the first record lacks a block's key but a later record has it, the block is skipped as upstream
  does, with an :class:`EvaluationNote` naming the first record that disagrees (``strict=True`` refuses).
* A query whose ``pred_relevant_windows`` is empty counts as a miss (IoU 0) in R1 / mIoU (upstream crashes)
  and, as upstream, is left out of the mAP mean. An empty split reports 0.0 everywhere (the official
  script gives NaN; CG-DETR writes zeros).
* GT windows with exactly equal IoU are visited in reverse index order (what upstream's
  ``argsort()[::-1]`` does on small arrays); this never matters on QVHighlights (§2.4 step 2).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import warnings
from typing import Any, Sequence

import numpy as np

from .atomic import save_json  # noqa: F401  (re-exported: engine.evaluate.save_json)
from .evaluate_inputs import (  # noqa: F401  (EvaluationNote, QidMismatchError, load_jsonl re-exported)
    HL_CLIP_LENGTH, SALIENCY_LEN_TOLERANCE, EvaluationNote, QidMismatchError, _block_present, _gt_saliency,
    _gt_windows, _match_qids, _note_lengths, _pred_saliency, _pred_windows, load_jsonl,
)

__all__ = [
    "DATASETS", "VARIANTS", "EvaluationNote", "QidMismatchError", "load_jsonl", "save_json", "evaluate", "evaluate_qvhighlights",
    "evaluate_charades_tacos", "evaluate_tvsum", "temporal_iou_cross", "mr_average_precision",
    "hl_average_precision", "top_k_trapezoid_ap", "main",
]

VARIANTS = ("official", "cgdetr")
DATASETS = ("qvhighlights", "charades", "tacos", "tvsum")


def _thresholds(lo: float, n: int) -> tuple[float, ...]:
    # linspace then 2-decimal rounding, exactly as upstream builds its threshold lists (§2)
    return tuple(float(f"{t:.2f}") for t in np.linspace(lo, 0.95, n))


MAP_THRESHOLDS = _thresholds(0.5, 10)  # 0.50 .. 0.95
R1_THRESHOLDS = {"official": MAP_THRESHOLDS, "cgdetr": _thresholds(0.3, 14)}  # cgdetr: 0.30 .. 0.95
MAX_PRED_WINDOWS = 10  # §2.4 step 1: part of the protocol
LENGTH_RANGES = {"short": (0.0, 10.0), "middle": (10.0, 30.0), "long": (30.0, 150.0), "full": None}
HL_LEVELS = {"Fair": 2, "Good": 3, "VeryGood": 4}  # binarise "score >= m"
TVSUM_TOP_K = 5


def _fmt(x: float) -> float:
    """``100 * x`` rounded the official way: ``float(f"{100 * x:.2f}")``."""
    return float(f"{100 * float(x):.2f}")


# ----------------------------------------------------------------------------------- metric math
def temporal_iou_cross(spans1: np.ndarray, spans2: np.ndarray) -> np.ndarray:
    """IoU of every pair, (N, 2) x (M, 2) -> (N, M); true union, 0/0 -> 0 (§2.1)."""
    inter = np.clip(np.minimum(spans1[:, None, 1], spans2[None, :, 1])
                    - np.maximum(spans1[:, None, 0], spans2[None, :, 0]), 0, None)
    union = (spans1[:, 1] - spans1[:, 0])[:, None] + (spans2[:, 1] - spans2[:, 0])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _paired_hull_iou(a: np.ndarray, b: np.ndarray) -> float:
    """R1's paired IoU (§2.1): intersection / hull, 0/0 -> 0."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    hull = max(a[1], b[1]) - min(a[0], b[0])
    return inter / hull if hull > 0 else 0.0


def mr_average_precision(pred: np.ndarray, gt: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Per-query MR AP at each threshold (§2.4). ``pred`` (P, 3) [st, ed, score], ``gt`` (G, 2) -> (T,).

    Algorithm: stable sort by score; for each prediction, at every threshold at once, take the first GT (in
    decreasing-IoU order) with IoU >= t that is not yet matched at t -> TP and lock it, else FP. Then
    VOC-2011 all-point AP: pad precision with 0 / recall with 0 and 1, make precision monotone from the
    right, sum Δrecall x precision.
    """
    thds = np.asarray(thresholds, dtype=np.float64)[:, None]  # (T, 1)
    n_pred, n_gt = len(pred), len(gt)
    if n_pred == 0:
        return np.zeros(len(thds))
    pred = pred[np.argsort(-pred[:, 2], kind="stable")]
    iou = temporal_iou_cross(pred[:, :2], gt)  # (P, G)
    if n_gt == 1:  # fast path: the first prediction reaching t takes the only GT
        hit = iou[:, 0][None, :] >= thds  # (T, P)
        tp = hit & (np.cumsum(hit, axis=1) == 1)
    else:
        tp = np.zeros((len(thds), n_pred), dtype=bool)
        locked = np.zeros((len(thds), n_gt), dtype=bool)
        gt_order = np.argsort(iou, axis=1, kind="stable")[:, ::-1]  # (P, G), decreasing IoU
        for p in range(n_pred):
            g = gt_order[p]
            free = (iou[p, g][None, :] >= thds) & ~locked[:, g]  # (T, G); IoU >= t is a prefix of g
            has = free.any(axis=1)
            tp[has, p] = True
            locked[np.flatnonzero(has), g[free.argmax(axis=1)[has]]] = True
    tp_cum = np.cumsum(tp, axis=1)  # (T, P)
    rank = np.arange(1, n_pred + 1)
    zeros, ones = np.zeros((len(thds), 1)), np.ones((len(thds), 1))
    mprec = np.hstack([zeros, tp_cum / rank, zeros])
    mrec = np.hstack([zeros, tp_cum / n_gt, ones])
    mprec = np.maximum.accumulate(mprec[:, ::-1], axis=1)[:, ::-1]
    return np.sum(np.diff(mrec, axis=1) * mprec[:, 1:], axis=1)  # Δrecall is 0 where recall is flat


def hl_average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Highlight AP (§2.5) of one score vector (n,) against C binary label columns (n, C) -> (C,).

    Operating points = distinct score values (ties grouped). Interpolated precision at a point = max
    precision at any lower threshold; AP = its unweighted mean over the distinct recall levels > 0, each
    taken at the highest threshold reaching it. 0 if a column has no positive, 1 if all positive.
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.int64)
    ends = np.append(np.flatnonzero(np.diff(s) != 0), len(s) - 1)  # last index of each tie group
    tp = np.cumsum(y, axis=0)[ends]  # (K, C)
    prec = tp / (ends + 1)[:, None]
    interp = np.maximum.accumulate(prec[::-1], axis=0)[::-1]
    new_level = np.diff(tp, axis=0, prepend=0) > 0  # recall rises at this point
    ap = (interp * new_level).sum(0) / np.maximum(new_level.sum(0), 1)
    n_pos = y.sum(0)
    ap[n_pos == 0] = 0.0
    ap[n_pos == len(y)] = 1.0
    return ap


def top_k_trapezoid_ap(scores: np.ndarray, labels: np.ndarray, k: int | None = TVSUM_TOP_K) -> np.ndarray:
    """TVSum / UMT AP (§3) of scores (n,) against binary labels (n, C) -> (C,).

    Rank by score (stable, descending), keep the top ``k`` (all if None); with ``h_j`` hits in the first j,
    AP = Σ_j (r_j - r_{j-1}) (p_{j-1} + p_j) / 2, r_j = h_j / h_k, p_j = h_j / j, (r_0, p_0) = (0, 1);
    0 if no positive in the top k.
    """
    y = labels[np.argsort(-scores, kind="stable")[:k]].astype(np.float64)  # (k, C)
    hits = np.cumsum(y, axis=0)
    num_gt = hits[-1]
    rec = hits / np.maximum(num_gt, 1)
    prc = hits / np.arange(1, len(y) + 1)[:, None]
    rec_prev = np.vstack([np.zeros((1, y.shape[1])), rec[:-1]])
    prc_prev = np.vstack([np.ones((1, y.shape[1])), prc[:-1]])
    ap = np.sum((rec - rec_prev) * (prc_prev + prc) / 2, axis=0)
    ap[num_gt == 0] = 0.0
    return ap


# ------------------------------------------------------------------------------ moment retrieval
def _query_mr(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray | None, float]:
    """(AP at each MAP_THRESHOLDS or None if no prediction, top-1 paired IoU) of one query."""
    if len(pred) == 0:
        return None, 0.0  # dropped from mAP (§2.4 step 5), a miss in R1
    top = pred[0, :2]  # file order: NOT re-sorted (§2.3)
    best = int(np.argmax(temporal_iou_cross(top[None], gt)[0]))  # first best GT on ties
    return mr_average_precision(pred[:MAX_PRED_WINDOWS], gt, MAP_THRESHOLDS), _paired_hull_iou(top, gt[best])


def _mr_split(per_query: list[tuple[np.ndarray | None, float]], variant: str) -> dict:
    """Metrics of one length split from its queries' ``_query_mr`` results."""
    aps = [a for a, _ in per_query if a is not None]
    ap = np.mean(aps, axis=0) if aps else np.zeros(len(MAP_THRESHOLDS))
    ious = np.array([iou for _, iou in per_query])
    m_ap = {str(t): _fmt(v) for t, v in zip(MAP_THRESHOLDS, ap)}
    m_ap["average"] = _fmt(np.mean(ap))
    r1 = {str(t): _fmt(np.mean(ious >= t)) if len(ious) else 0.0 for t in R1_THRESHOLDS[variant]}
    out = {"MR-mAP": m_ap, "MR-R1": r1}
    if variant == "cgdetr":
        out = {"MR-mIoU": _fmt(np.mean(ious)) if len(ious) else 0.0, **out}
    return out


def _eval_moment_retrieval(sub: dict, gt: dict, qids: list, variant: str, verbose: bool) -> dict:
    preds = {q: _pred_windows(sub[q], qids[0]) for q in qids}  # validate everything before any metric
    gts = {q: _gt_windows(gt[q]) for q in qids}
    cache: dict = {}  # (qid, kept windows) -> _query_mr; most queries keep all windows in their split
    ret = {}
    for name, rng in LENGTH_RANGES.items():
        per_query = []
        for q in qids:
            g = gts[q]
            keep = np.ones(len(g), dtype=bool)
            if rng is not None:
                length = g[:, 1] - g[:, 0]
                keep = (length > rng[0]) & (length <= rng[1])
            if keep.any():
                key = (q, keep.tobytes())
                if key not in cache:
                    cache[key] = _query_mr(preds[q], g[keep])
                per_query.append(cache[key])
        if verbose:
            n = len(per_query)
            print(f"{name}: {rng or 'all'}, {n}/{len(qids)}={100 * n / len(qids):.2f} examples.", file=sys.stderr)
        ret[name] = _mr_split(per_query, variant)
    return ret


def _mr_brief(mr: dict, variant: str) -> dict:
    full = mr["full"]
    brief = {"MR-full-mAP": full["MR-mAP"]["average"], "MR-full-mAP@0.5": full["MR-mAP"]["0.5"],
             "MR-full-mAP@0.75": full["MR-mAP"]["0.75"], "MR-full-R1@0.5": full["MR-R1"]["0.5"],
             "MR-full-R1@0.7": full["MR-R1"]["0.7"]}
    for name in ("short", "middle", "long"):
        brief[f"MR-{name}-mAP"] = mr[name]["MR-mAP"]["average"]
    if variant == "cgdetr":
        brief["MR-full-mIoU"] = full["MR-mIoU"]
        brief["MR-full-R1@0.3"] = full["MR-R1"]["0.3"]
    return dict(sorted(brief.items()))


# ---------------------------------------------------------------------------- highlight detection
def _hl_inputs(sub: dict, gt: dict, qids: list, strict: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validated (GT scores (n, 3), raw predicted saliency) per query, before any metric is computed."""
    out = []
    for q in qids:
        gt_scores = _gt_saliency(gt[q])
        out.append((gt_scores, _pred_saliency(sub[q], len(gt_scores), strict, qids[0])))
    _note_lengths(qids, [len(p) for _, p in out], [len(g) for g, _ in out])
    return out


def _eval_highlight(inputs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    n_lv = len(HL_LEVELS)
    aps = np.zeros((len(inputs), n_lv, 3))  # (Q, level, annotator)
    hits = np.zeros((len(inputs), n_lv))
    for i, (gt_scores, raw) in enumerate(inputs):
        n = len(gt_scores)
        pred = raw[:n] if len(raw) >= n else np.pad(raw, (0, n - len(raw)))  # 0.0-padding (§2.5)
        labels = np.concatenate([gt_scores >= m for m in HL_LEVELS.values()], axis=1)  # (n, 3 * n_lv)
        aps[i] = hl_average_precision(pred, labels).reshape(n_lv, 3)
        top = int(np.argmax(raw))  # over the whole predicted list, first on ties
        if top < n:
            hits[i] = labels[top].reshape(n_lv, 3).any(axis=1)
    return {f"HL-min-{name}": {"HL-mAP": _fmt(aps[:, j].mean()), "HL-Hit1": _fmt(hits[:, j].mean())}
            for j, name in enumerate(HL_LEVELS)}


# ------------------------------------------------------------------------------------ public API
def evaluate_qvhighlights(submission: list[dict], ground_truth: list[dict], verbose: bool = False,
                          match_number: bool = True, variant: str = "official", strict: bool = False) -> dict:
    """Official QVHighlights metrics (§2), or CG-DETR's extension with ``variant="cgdetr"`` (§3).

    ``strict``: refuse saliency lists more than ``SALIENCY_LEN_TOLERANCE`` clips off and records that disagree
    with the first about which blocks exist (by default both are handled as upstream, with an
    :class:`EvaluationNote` warning).

    Returns ``{"brief": {...}, "HL-min-Fair": {"HL-mAP", "HL-Hit1"}, "HL-min-Good": ...,
    "HL-min-VeryGood": ..., "full": {["MR-mIoU",] "MR-mAP": {"0.5".."0.95", "average"}, "MR-R1": {...}},
    "long": ..., "middle": ..., "short": ...}`` -- the MR keys only if the first submission record has
    ``pred_relevant_windows``, the HL keys only if it has ``pred_saliency_scores``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    sub, gt, qids = _match_qids(submission, ground_truth, match_number)
    # the first record after the qid check decides which blocks run (§1)
    has_hl = _block_present(sub, qids, "pred_saliency_scores", "HL", strict)
    has_mr = _block_present(sub, qids, "pred_relevant_windows", "MR", strict)
    hl_inputs = _hl_inputs(sub, gt, qids, strict) if has_hl else None
    metrics, brief = {}, {}
    if has_mr:
        mr = _eval_moment_retrieval(sub, gt, qids, variant, verbose)
        metrics.update(mr)
        brief.update(_mr_brief(mr, variant))
    if hl_inputs is not None:
        hl = _eval_highlight(hl_inputs)
        metrics.update(hl)
        brief.update({f"{k}-{sub_k.split('-')[1]}": v for k, d in hl.items() for sub_k, v in d.items()})
    return {"brief": brief, **dict(sorted(metrics.items()))}


def evaluate_charades_tacos(submission: list[dict], ground_truth: list[dict], verbose: bool = False,
                            match_number: bool = True) -> dict:  # MR only: nothing for ``strict`` to check
    """Charades-STA / TACoS moment retrieval with CG-DETR's evaluator (§3): MR only, same splits.

    Brief keys: ``MR-full-R1@0.3``, ``MR-full-R1@0.5``, ``MR-full-R1@0.7``, ``MR-full-mIoU``, ``MR-full-mAP``,
    ``MR-full-mAP@0.5``, ``MR-full-mAP@0.75``, ``MR-{short,middle,long}-mAP``.
    """
    sub, gt, qids = _match_qids(submission, ground_truth, match_number)
    mr = _eval_moment_retrieval(sub, gt, qids, "cgdetr", verbose)
    return {"brief": _mr_brief(mr, "cgdetr"), **dict(sorted(mr.items()))}


def evaluate_tvsum(predictions: list[dict], ground_truth: list[dict], top_k: int | None = TVSUM_TOP_K,
                   match_number: bool = True, strict: bool = False) -> dict:
    """TVSum highlight detection (§3, "following UMT").

    ``predictions``: ``{"qid", "pred_saliency_scores"}`` per video; ``ground_truth``: TVSum records with
    ``label`` (n_clips, 20) and ``domain``. Returns ``{"brief": {"HL-Top5-mAP": mean over domains,
    "HL-<D>-Top5-mAP": per domain ...}, "per_domain": {D: {"Top5-mAP", "num_videos"}}}``; with
    ``top_k=None`` the names read ``mAP`` (all clips ranked, YouTube-Highlights style).
    """
    sub, gt, qids = _match_qids(predictions, ground_truth, match_number)
    per_domain: dict[str, list[np.ndarray]] = {}
    lens = []
    for q in qids:
        rec = gt[q]
        try:
            label = np.asarray(rec["label"], dtype=np.float64)
            domain = str(rec["domain"])
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"ground truth qid {q!r}: need 'label' (n_clips x annotators) and 'domain'") from None
        if label.ndim != 2 or len(label) == 0:
            raise ValueError(f"ground truth qid {q!r}: 'label' must be (n_clips, annotators), got {label.shape}")
        raw = _pred_saliency(sub[q], len(label), strict, qids[0])
        lens.append((len(raw), len(label)))
        pred = raw[: len(label)]  # upstream truncates, never pads
        median = np.sort(label, axis=0)[(len(label) - 1) // 2]  # torch median: lower middle value
        binary = label[: len(pred)] > median
        per_domain.setdefault(domain, []).append(top_k_trapezoid_ap(pred, binary, top_k))
    _note_lengths(qids, [p for p, _ in lens], [g for _, g in lens], pad=False)
    name = f"Top{top_k}-mAP" if top_k else "mAP"
    dom_ap = {d: float(np.mean(v)) for d, v in sorted(per_domain.items())}
    brief = {f"HL-{name}": _fmt(np.mean(list(dom_ap.values())))}
    brief.update({f"HL-{d}-{name}": _fmt(v) for d, v in dom_ap.items()})
    return {"brief": brief,
            "per_domain": {d: {name: _fmt(v), "num_videos": len(per_domain[d])} for d, v in dom_ap.items()}}


def evaluate(submission: list[dict], ground_truth: list[dict], dataset: str = "qvhighlights", **kwargs) -> dict:
    """Dispatch on ``dataset`` (one of ``DATASETS``); ``kwargs`` go to the dataset's evaluator."""
    if dataset == "qvhighlights":
        return evaluate_qvhighlights(submission, ground_truth, **kwargs)
    if dataset in ("charades", "tacos"):
        return evaluate_charades_tacos(submission, ground_truth, **kwargs)
    if dataset == "tvsum":
        return evaluate_tvsum(submission, ground_truth, **kwargs)
    near = difflib.get_close_matches(str(dataset), DATASETS, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ValueError(f"unknown dataset {dataset!r}{hint}; valid: {', '.join(DATASETS)}")


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from . import cli

    ap = cli.parser("python -m engine.evaluate", __doc__.split("\n")[0],
                    "python -m engine.evaluate --submission preds.jsonl --ann highlight_val_release.jsonl "
                    "--out metrics.json")
    ap.add_argument("--submission", required=True, help="predictions, JSON lines (official submission format)")
    ap.add_argument("--ann", "--gt", dest="ann", required=True, help="ground-truth annotation file, JSON lines")
    ap.add_argument("--dataset", default="qvhighlights", choices=DATASETS)
    ap.add_argument("--variant", default="official", choices=VARIANTS,
                    help="QVHighlights evaluator: official, or cgdetr (adds R1@0.3..0.45 and mIoU)")
    ap.add_argument("--out", default=None, help="a file: the full metrics dict as JSON (written atomically)")
    ap.add_argument("--no-match-number", action="store_true",
                    help="evaluate the qids both files share instead of refusing different qid sets")
    ap.add_argument("--strict", action="store_true",
                    help="refuse saliency lists more than 1 clip off the ground truth and records that disagree "
                         "with the first about which keys they have (the official evaluator pads / skips)")
    ap.add_argument("--verbose", action="store_true", help="print the per-split query counts")
    cli.add_device(ap, note="the metrics are computed with numpy")
    cli.add_quiet(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from . import cli

    args = build_parser().parse_args(argv)
    try:
        cli.resolve_device(args.device)  # checked only (no model runs here), before any file is read
    except ValueError as e:
        return cli.fail(e)
    kwargs: dict[str, Any] = {"match_number": not args.no_match_number}
    if args.dataset == "qvhighlights":
        kwargs.update(variant=args.variant, verbose=args.verbose, strict=args.strict)
    elif args.dataset in ("charades", "tacos"):
        kwargs.update(verbose=args.verbose)
    else:
        kwargs.update(strict=args.strict)
    try:
        submission, ground_truth = load_jsonl(args.submission), load_jsonl(args.ann)
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", EvaluationNote)
            metrics = evaluate(submission, ground_truth, dataset=args.dataset, **kwargs)
        if args.out:
            save_json(metrics, args.out)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except QidMismatchError as e:
        return cli.fail(e.hint(cli=True))
    except OSError as e:
        return cli.fail(cli.os_error_line(e))
    except ValueError as e:
        return cli.fail(e)
    if not args.quiet:
        for n in notes:
            if issubclass(n.category, EvaluationNote):
                print(f"note: {n.message}", file=sys.stderr)
    print(json.dumps(metrics["brief"], indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
