"""The one annotation-record validator, shared by :class:`engine.data.MomentDataset` (raises on the first
problem) and ``python -m engine.data check`` (counts every problem), so the check never calls "clean" what
the loader or training then rejects.

Every problem is a ``(category, message)`` pair; categories are keys of
:data:`engine.data_check.CHECK_CATEGORIES`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .features import DataError


def record_windows(rec: dict) -> np.ndarray:
    """(n, 2) float64 ``relevant_windows`` of one record (empty when absent); DataError when malformed."""
    value = rec.get("relevant_windows")
    if value is None:
        return np.zeros((0, 2))
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1, 2) if len(value) else np.zeros((0, 2))
    except (ValueError, TypeError):
        raise DataError(f"qid {rec['qid']!r}: relevant_windows must be [[start, end], ...], got {str(value)[:80]}") from None
    return arr


def window_problems(rec: dict) -> list[str]:
    """Descriptions of empty / reversed / out-of-range windows of one record ([] when all are fine)."""
    out = []
    duration = float(rec["duration"])
    for st, ed in record_windows(rec):
        if not (np.isfinite(st) and np.isfinite(ed)):
            out.append(f"non-finite window [{st:g}, {ed:g}]")
        elif ed < st:
            out.append(f"window [{st:g}, {ed:g}] has start > end")
        elif ed == st:
            out.append(f"empty window [{st:g}, {ed:g}]")
        elif st < 0 or ed > duration * (1 + 1e-6) + 1e-6:
            out.append(f"window [{st:g}, {ed:g}] outside [0, duration={duration:g}]")
    return out


def num_clips(duration: float, clip_length: float) -> int:
    """Clips of a ``duration``-second video (a partial last clip counts)."""
    return max(1, math.ceil(duration / clip_length - 1e-6))


def record_problems(rec: dict, rule: str, load_labels: bool, clip_length: float | None = None,
                    max_v_l: int | None = None) -> list[tuple[str, str]]:
    """Every problem of one annotation record as ``(category, message)``; [] when it is usable.

    ``load_labels``: the record must carry the labels of its dataset ``rule`` (windows; QVHighlights also
    clip ids and saliency scores; TVSum a ``label`` matrix). ``clip_length``: check clip ids against the
    duration. ``max_v_l`` (> 0): a video longer than ``max_v_l`` clips (by more than one) is a problem —
    the model would see only its beginning and its windows would be scaled wrongly.
    """
    try:
        duration = float(rec["duration"])
    except (KeyError, TypeError, ValueError):
        return [("bad_annotation", f"needs a numeric 'duration', got {rec.get('duration')!r}")]
    if not (duration > 0 and math.isfinite(duration)):
        return [("bad_annotation", f"duration must be a finite number > 0, got {duration}")]
    out: list[tuple[str, str]] = []
    if (max_v_l is not None and max_v_l > 0 and clip_length and rule != "tvsum"
            and duration > (max_v_l + 1) * clip_length):
        out.append(("too_long", f"duration {duration:g} s is longer than max_v_l={max_v_l} clips x {clip_length:g} s "
                                f"= {max_v_l * clip_length:g} s (the model would see only that beginning)"))
    if not load_labels:
        return out
    if rule == "tvsum":
        try:
            label = np.asarray(rec["label"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            return out + [("bad_annotation", "TVSum labels need a 'label' list of per-clip annotator scores")]
        if label.ndim != 2 or label.shape[0] == 0 or not np.isfinite(label).all():
            out.append(("bad_annotation", f"'label' must be a non-empty finite (clips, annotators) array, "
                                          f"got shape {label.shape}"))
        return out
    try:
        windows = record_windows(rec)
    except DataError as e:
        return out + [("bad_window", str(e).split(": ", 1)[-1])]
    if len(windows) == 0:
        out.append(("bad_annotation", "no relevant_windows (labels are needed to train and evaluate; an unlabelled test split can only be predicted)"))
    out += [("bad_window", f"{msg} (duration {duration:g})") for msg in window_problems(rec)]
    if rule == "all":
        out += _saliency_problems(rec, duration, clip_length)
    return out


def _saliency_problems(rec: dict, duration: float, clip_length: float | None) -> list[tuple[str, str]]:
    ids, scores = rec.get("relevant_clip_ids"), rec.get("saliency_scores")
    if not ids or scores is None:
        return [("bad_annotation", "QVHighlights labels need non-empty 'relevant_clip_ids' and 'saliency_scores' "
                                   "(missing saliency labels)")]
    try:
        sc = np.asarray(scores, dtype=np.float64)
        ids_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        return [("bad_annotation", "'relevant_clip_ids'/'saliency_scores' are not numeric")]
    if sc.ndim != 2 or sc.shape[0] != len(ids_arr):
        return [("bad_annotation", f"need one saliency_scores row per relevant clip id "
                                   f"({len(ids_arr)} ids, scores shape {sc.shape})")]
    if not np.isfinite(sc).all():
        return [("bad_annotation", "saliency_scores has NaN/inf values")]
    n = num_clips(duration, clip_length) if clip_length else None
    bad = ids_arr[(ids_arr < 0) | (ids_arr >= n if n is not None else False)]
    if bad.size:
        limit = f"[0, {n})" if n is not None else "[0, ...)"
        return [("bad_clip_ids", f"relevant_clip_ids {_few(bad.tolist())} outside {limit} "
                                 f"(duration {duration:g} s / clip length {clip_length:g} s)"
                 if clip_length else f"negative relevant_clip_ids {_few(bad.tolist())}")]
    return []


def validate_record(rec: dict, rule: str, load_labels: bool, source: Any = None, clip_length: float | None = None,
                    max_v_l: int | None = None) -> None:
    """:func:`record_problems`, raising ``DataError`` naming the file and qid on the first problem."""
    problems = record_problems(rec, rule, load_labels, clip_length, max_v_l)
    if problems:
        where = f"{source}: qid {rec['qid']!r}" if source else f"qid {rec['qid']!r}"
        raise DataError(f"{where}: {problems[0][1]}")


def _few(items: list, n: int = 5) -> str:
    return repr(items[:n])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > n else "]")
