"""``--verify --data-root DIR``: the exported artifact's metrics on a real split next to PyTorch's, as
ultralytics' benchmark mode reports them — the same batches through both, the official post-processing and
evaluator, then the difference per metric (R1@0.5, mAP, HIT@1, ...)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .model import Prepared

#: the metrics printed (when the dataset's evaluator reports them), in this order
KEY_METRICS = ("MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1",
               "HL-Top5-mAP")


class MetricsError(ValueError):
    """A split that cannot be evaluated (no annotation file, no ground truth, no feature contract)."""


def metric_deltas(prepared: Prepared, runner, data_root: str | os.PathLike, *, split: str = "val",
                  ann: str | os.PathLike | None = None, batch_size: int = 32, static_video_len: int | None = None,
                  max_queries: int | None = None) -> dict:
    """Evaluate PyTorch and ``runner`` (numpy outputs from CPU tensors) on the split; returns
    ``{"torch": brief, "artifact": brief, "delta": {metric: artifact - torch}, "queries": n, "ann": path}``.
    ``static_video_len``: pad every batch's videos to it (artifacts with a static video length)."""
    from engine.data import DataError, FeatureSpec, MomentDataset, find_split, load_annotations, make_loader
    from engine.evaluate import evaluate
    from engine.postprocess import to_records

    data_root = Path(data_root)
    if not data_root.is_dir():
        raise MetricsError(f"--data-root {data_root} is not a folder")
    contract = json.loads(prepared.metadata.get("ld_detr.feature_contract") or "null")
    if contract is None:
        raise MetricsError(f"{prepared.source}: checkpoint has no feature contract; cannot load features")
    spec = FeatureSpec.from_dict(contract)
    dataset = prepared.metadata.get("ld_detr.dataset", "qvhighlights")
    try:
        ann_path = Path(ann) if ann is not None else find_split(data_root, split)
    except DataError as e:
        raise MetricsError(str(e)) from e
    records = load_annotations(ann_path)
    if max_queries is not None:
        records = records[:max_queries]
    if not all(r.get("relevant_windows") for r in records):
        raise MetricsError(f"{ann_path}: some queries have no relevant_windows (ground truth); cannot evaluate")
    cfg = prepared.cfg
    loader = make_loader(MomentDataset(records, data_root, spec, dataset=dataset, load_labels=False), batch_size,
                         shuffle=False)
    post = dict(dataset=dataset, clip_length=cfg.clip_length, nms_thd=cfg.nms_thd,
                max_before_nms=cfg.max_before_nms, max_after_nms=cfg.max_after_nms)
    ours, theirs = [], []
    for batch in loader:
        x = (batch["video"], batch["video_mask"].bool(), batch["text"], batch["text_mask"].bool())
        t = x[0].shape[1]
        with torch.no_grad():
            ref = prepared.module(*(v.to(prepared.device) for v in x))
        ref = [r.float().cpu() for r in ref]
        if static_video_len is not None and static_video_len > t:
            pad = static_video_len - t
            x = (torch.nn.functional.pad(x[0], (0, 0, 0, pad)), torch.nn.functional.pad(x[1], (0, pad)), x[2], x[3])
        got = [torch.from_numpy(np.asarray(g, dtype=np.float32)) for g in runner(*x)]
        got[2] = got[2][:, :t]
        for out, sink in ((ref, ours), (got, theirs)):
            sink += to_records({"pred_logits": out[0], "pred_spans": out[1], "saliency_scores": out[2],
                                "video_mask": batch["video_mask"].bool()}, batch["meta"], **post)
    eval_ds = "qvhighlights" if dataset == "synthetic" else dataset
    m_ref = evaluate(ours, records, dataset=eval_ds)["brief"]
    m_art = evaluate(theirs, records, dataset=eval_ds)["brief"]
    delta = {k: m_art[k] - m_ref[k] for k in m_ref if k in m_art and isinstance(m_ref[k], (int, float))}
    return {"torch": m_ref, "artifact": m_art, "delta": delta, "queries": len(records), "ann": str(ann_path)}


def format_deltas(result: dict) -> str:
    keys = [k for k in KEY_METRICS if k in result["torch"]] or list(result["torch"])[:6]
    lines = [f"metrics on {result['ann']} ({result['queries']} queries)",
             f"{'metric':<24} {'pytorch':>9} {'artifact':>9} {'delta':>8}"]
    for k in keys:
        lines.append(f"{k:<24} {result['torch'][k]:>9.2f} {result['artifact'][k]:>9.2f} {result['delta'][k]:>+8.2f}")
    return "\n".join(lines)
