"""Model outputs -> official submission records (spec ``ld-detr-code.md`` §5).

Per query: the foreground probability ``softmax(logits)[..., 0]`` of each of the Q predicted spans; the
span in seconds ``clamp(cxw_to_xx(span) * duration, 0, duration)``; rows ``[st, ed, score]`` sorted by
score, all Q kept (no NMS by default), then the official per-dataset post-processor:

* QVHighlights: clamp to [0, 150] s, then round to a multiple of the clip length (2 s);
* Charades-STA: clamp to [0, 150] s, round to a multiple of the clip length (1 s);
* TACoS: only round to a multiple of 2 s;

values rounded to 4 decimals. Saliency: ``saliency_scores[b, :n_valid_clips]`` rounded through fp16
(QVHighlights-format datasets only; Charades/TACoS records carry none).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.span_utils import span_cxw_to_xx

#: dataset -> (clamp range in seconds or None, rounding multiple in seconds or None ("clip length"), saliency?)
_POSTPROC = {
    "qvhighlights": ((0.0, 150.0), "clip", True),
    "charades": ((0.0, 150.0), "clip", False),
    "tacos": (None, 2.0, False),
    "tvsum": (None, None, True),
    "synthetic": (None, "clip", True),
}


def temporal_nms(rows: list[list[float]], thd: float, max_after: int) -> list[list[float]]:
    """Greedy temporal NMS on rows [st, ed, score] sorted by score (only when ``nms_thd > 0``)."""
    kept: list[list[float]] = []
    for st, ed, sc in rows:
        ok = True
        for kst, ked, _ in kept:
            inter = max(0.0, min(ed, ked) - max(st, kst))
            union = (ed - st) + (ked - kst) - inter
            if union > 0 and inter / union > thd:
                ok = False
                break
        if ok:
            kept.append([st, ed, sc])
        if len(kept) >= max_after:
            break
    return kept


def to_records(outputs: dict[str, Tensor], meta: list[dict], *, dataset: str = "qvhighlights",
               clip_length: float = 2.0, nms_thd: float = -1.0, max_before_nms: int = 10,
               max_after_nms: int = 10) -> list[dict]:
    """Turn one batch of eval outputs into submission dicts.

    ``meta`` holds, per sample, ``qid``, ``vid``, ``query`` and ``duration`` (seconds). Returns dicts with
    ``qid, query, vid, pred_relevant_windows`` and (QVHighlights-format) ``pred_saliency_scores``.
    """
    if dataset not in _POSTPROC:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_POSTPROC)}")
    clamp_range, multiple, with_saliency = _POSTPROC[dataset]
    multiple = clip_length if multiple == "clip" else multiple
    probs = outputs["pred_logits"].float().softmax(-1)[..., 0].cpu()  # (B, Q)
    spans = span_cxw_to_xx(outputs["pred_spans"].float()).cpu()  # (B, Q, 2), normalised
    lengths = outputs["video_mask"].sum(1).cpu()
    saliency = outputs["saliency_scores"].detach().to(torch.float16).float().cpu()
    records = []
    for b, m in enumerate(meta):
        duration = float(m["duration"])
        win = (spans[b] * duration).clamp(0.0, duration)  # (Q, 2) seconds
        if clamp_range is not None:
            win = win.clamp(*clamp_range)
        if multiple:
            win = torch.round(win / multiple) * multiple
        rows = torch.cat([win, probs[b][:, None]], dim=1)  # (Q, 3)
        rows = rows[rows[:, 2].argsort(descending=True, stable=True)]
        rows = [[round(float(x), 4) for x in r] for r in rows.tolist()]
        if nms_thd > 0:
            rows = temporal_nms(rows[:max_before_nms], nms_thd, max_after_nms)
        rec = {"qid": m["qid"], "query": m.get("query", ""), "vid": m.get("vid", ""), "pred_relevant_windows": rows}
        if with_saliency:
            rec["pred_saliency_scores"] = [round(float(x), 4) for x in saliency[b, : int(lengths[b])].tolist()]
        records.append(rec)
    return records
