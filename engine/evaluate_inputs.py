"""Submission / ground-truth reading and checking for :mod:`engine.evaluate` (spec ``evaluation.md`` §1, §2.5):
JSON lines, the qid check, per-record window / saliency validation, and the notes on what the official
evaluator does silently (padding / truncating saliency, skipping a block the first record lacks)."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import numpy as np

HL_CLIP_LENGTH = 2.0
SALIENCY_LEN_TOLERANCE = 1  # --strict: at most this many clips off (the val files are 1 short on 13 queries)


class EvaluationNote(UserWarning):
    """Something the official evaluator does silently (padding, a skipped block); the CLI prints it."""


class QidMismatchError(ValueError):
    """Submission and ground-truth qids differ; ``hint(cli=True)`` names the CLI flag, not the argument."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"{message} (use match_number=False to evaluate the intersection)")

    def hint(self, cli: bool) -> str:
        how = "--no-match-number" if cli else "match_number=False"
        return f"{self.message} (use {how} to evaluate the intersection)"


def _few(items: Sequence[Any], n: int = 5) -> str:
    head = ", ".join(repr(q) for q in list(items)[:n])
    return f"[{head}{', ...' if len(items) > n else ''}]"


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file (blank lines skipped). Bad JSON raises ``ValueError`` naming the line."""
    records = []
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    return records


def _index_by_qid(records: Sequence[dict], what: str) -> dict:
    if not isinstance(records, (list, tuple)):
        raise ValueError(f"{what} must be a list of dicts, got {type(records).__name__}")
    out: dict = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "qid" not in rec:
            raise ValueError(f"{what} record {i} is not a dict with a 'qid' key: {str(rec)[:80]}")
        qid = rec["qid"]
        if not isinstance(qid, (int, str)):
            raise ValueError(f"{what} record {i}: qid must be an int or a str, got {qid!r}")
        if qid in out:
            raise ValueError(f"duplicate qid {qid!r} in {what} (records {out[qid][0]} and {i})")
        out[qid] = (i, rec)
    return {q: r for q, (_, r) in out.items()}


def _match_qids(submission, ground_truth, match_number: bool) -> tuple[dict, dict, list]:
    """Index both sides by qid and apply the §1 qid check. Returns (sub, gt, qids in submission order)."""
    sub = _index_by_qid(submission, "submission")
    gt = _index_by_qid(ground_truth, "ground truth")
    missing = [q for q in gt if q not in sub]
    extra = [q for q in sub if q not in gt]
    if match_number and (missing or extra):
        raise QidMismatchError(
            f"submission and ground truth qids differ: {len(missing)} qid(s) missing from the submission "
            f"{_few(missing)}, {len(extra)} extra qid(s) not in the ground truth {_few(extra)}")
    qids = [q for q in sub if q in gt]
    if not qids:
        raise ValueError("submission and ground truth share no qid")
    return sub, gt, qids


def _as_array(value: Any, width: int, qid: Any, key: str, what: str) -> np.ndarray:
    """``value`` -> float64 (N, width) array of finite numbers, or ValueError naming the qid."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"qid {qid!r}: '{key}' must be a list of {what}, got {type(value).__name__}")
    if len(value) == 0:
        return np.zeros((0, width))
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"qid {qid!r}: '{key}' must be a list of {what}, got {str(value)[:80]}") from None
    if arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"qid {qid!r}: '{key}' must be a list of {what}, got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(1) | (arr[:, 0] > arr[:, 1])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"qid {qid!r}: {key}[{i}] = {value[i]} is malformed (need finite start <= end)")
    return arr


def _pred_windows(rec: dict, first_qid: Any = None) -> np.ndarray:
    if "pred_relevant_windows" not in rec:
        first = f"qid {first_qid!r}" if first_qid is not None else "the first record"
        raise ValueError(f"qid {rec['qid']!r}: submission record lacks 'pred_relevant_windows' "
                         f"(the first record, {first}, has it, so every record must)")
    return _as_array(rec["pred_relevant_windows"], 3, rec["qid"], "pred_relevant_windows",
                     "[start, end, score] windows")


def _gt_windows(rec: dict) -> np.ndarray:
    arr = _as_array(rec.get("relevant_windows"), 2, rec["qid"], "relevant_windows", "[start, end] windows")
    if len(arr) == 0:
        raise ValueError(f"ground truth qid {rec['qid']!r} has no relevant_windows")
    return arr


def _pred_saliency(rec: dict, num_clips: int, strict: bool = False, first_qid: Any = None) -> np.ndarray:
    qid, value = rec["qid"], rec.get("pred_saliency_scores")
    if value is None:
        first = f"qid {first_qid!r}" if first_qid is not None else "the first record"
        raise ValueError(f"qid {qid!r}: submission record lacks 'pred_saliency_scores' "
                         f"(the first record, {first}, has it, so every record must)")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        arr = np.zeros((0, 0))
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"qid {qid!r}: 'pred_saliency_scores' must be a non-empty list of finite numbers")
    if strict and abs(arr.size - num_clips) > SALIENCY_LEN_TOLERANCE:
        raise ValueError(f"qid {qid!r}: pred_saliency_scores has {arr.size} scores, the ground truth has "
                         f"{num_clips} clips (--strict accepts at most {SALIENCY_LEN_TOLERANCE} off)")
    return arr


def _note_lengths(qids: Sequence[Any], pred_lens: Sequence[int], gt_lens: Sequence[int], pad: bool = True) -> None:
    """One :class:`EvaluationNote` with how many saliency lists were padded / truncated (upstream: silent)."""
    short = [q for q, p, g in zip(qids, pred_lens, gt_lens) if p < g]
    long = [q for q, p, g in zip(qids, pred_lens, gt_lens) if p > g]
    parts = []
    if short:
        what = "padded with 0.0" if pad else "scored on their common length"
        parts.append(f"{len(short)} quer{'y' if len(short) == 1 else 'ies'} with fewer saliency scores than "
                     f"clips ({what}, as the official evaluator does) {_few(short)}")
    if long:
        parts.append(f"{len(long)} quer{'y' if len(long) == 1 else 'ies'} with more saliency scores than clips "
                     f"(truncated) {_few(long)}")
    if parts:
        warnings.warn("; ".join(parts), EvaluationNote, stacklevel=3)


def _block_present(sub: dict, qids: list, key: str, block: str, strict: bool) -> bool:
    """Whether the ``block`` (MR / HL) runs: the first record decides (§1); a later record that disagrees
    is named in a note (``strict``: an error)."""
    has_first = key in sub[qids[0]]
    if has_first:
        return True
    other = next((q for q in qids if key in sub[q]), None)
    if other is not None:
        msg = (f"the first submission record (qid {qids[0]!r}) has no {key!r}, so the {block} block is skipped "
               f"as the official evaluator does, but qid {other!r} has it")
        if strict:
            raise ValueError(msg + " (--strict refuses a submission whose records disagree)")
        warnings.warn(msg, EvaluationNote, stacklevel=3)
    return False


def _gt_saliency(rec: dict) -> np.ndarray:
    """(num_clips, 3) annotator scores, 0 outside ``relevant_clip_ids`` (§2.5)."""
    qid = rec["qid"]
    try:
        num_clips = int(float(rec["duration"]) / HL_CLIP_LENGTH)
        ids = np.asarray(rec["relevant_clip_ids"], dtype=np.int64).reshape(-1)
        scores = np.asarray(rec["saliency_scores"], dtype=np.float64).reshape(len(ids), 3)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"ground truth qid {qid!r}: need 'duration', 'relevant_clip_ids' and one "
                         f"[a1, a2, a3] 'saliency_scores' triple per clip id ({type(e).__name__}: {e})") from None
    if ids.size and (ids.min() < 0 or ids.max() >= num_clips):
        raise ValueError(f"ground truth qid {qid!r}: relevant_clip_ids outside [0, {num_clips})")
    full = np.zeros((num_clips, 3))
    full[ids] = scores
    return full
