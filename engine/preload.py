"""``--preload``: the training split's features held in memory and batched there (issue 15, item 5).

Every video (once per ``vid``) and every query's text features are read once, padded into two tensors that
live on the training device (GPU memory when training there; ``fp16=True`` halves it), and each batch is an
``index_select`` of them, so a millisecond-scale step never waits on ``.npz`` files or worker processes.
A QVHighlights-sized split (~7k train videos x 75 clips x 2818 channels) is ~6 GB fp32, ~3 GB fp16.

Batches are those of :func:`engine.data.make_loader` with the same seed: the same order (the same
sampler), the same labels (``MomentDataset.labels``, re-drawn per epoch by its (seed, epoch, index) rule),
the same layout (:func:`engine.data.collate`), padded to the batch's longest video and text. Per batch one
small host-to-device copy carries the indices, lengths and labels. Audio features are not supported.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import torch

from .data import DataError, EpochShuffleSampler, MomentDataset, pad_spans


class PreloadedLoader:
    """An iterable of training batches cut from device-resident features (see module doc).

    Args:
        dataset: a labelled :class:`MomentDataset`; batch_size: B; device: where the features live;
        shuffle/seed: as :func:`engine.data.make_loader`; fp16: store the features in half precision (batches
        are handed out in float32); sampler: e.g. a ``DistributedSampler`` (default: as make_loader's).
    """

    def __init__(self, dataset: MomentDataset, batch_size: int, device: torch.device, shuffle: bool = True,
                 seed: int = 0, fp16: bool = False, sampler=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not dataset.load_labels:
            raise DataError("--preload holds a training split: the dataset must load labels")
        self.dataset, self.batch_size, self.device = dataset, batch_size, torch.device(device)
        self.sampler = sampler if sampler is not None else (EpochShuffleSampler(len(dataset), seed) if shuffle
                                                            else range(len(dataset)))
        store = torch.float16 if fp16 else torch.float32
        t0 = time.perf_counter()
        vid_index: dict[str, int] = {}
        videos, texts, vid_of = [], [], []
        for i in range(len(dataset)):
            item = dataset[i]  # reads and checks the features exactly as training without --preload does
            if item["vid"] not in vid_index:
                vid_index[item["vid"]] = len(videos)
                videos.append(item["video"])
            vid_of.append(vid_index[item["vid"]])
            texts.append(item["text"])
        self.vid_of = np.asarray(vid_of, dtype=np.int64)  # (N,) item -> video row
        self.v_len = np.asarray([len(v) for v in videos], dtype=np.int64)  # (V,)
        self.t_len = np.asarray([len(t) for t in texts], dtype=np.int64)  # (N,)
        self.videos = self._stack(videos, store)  # (V, T_max, Dv) on the device
        self.texts = self._stack(texts, store)  # (N, N_max, Dt) on the device
        self.load_s = time.perf_counter() - t0

    def _stack(self, seqs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros((len(seqs), max(len(s) for s in seqs)) + tuple(seqs[0].shape[1:]), dtype=dtype,
                          device=self.device)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s.to(device=self.device, dtype=dtype)
        return out

    @property
    def nbytes(self) -> int:
        return self.videos.numel() * self.videos.element_size() + self.texts.numel() * self.texts.element_size()

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = list(iter(self.sampler))
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order[start:start + self.batch_size])

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """The batch of dataset items ``indices``, laid out as :func:`engine.data.collate` lays it out."""
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.vid_of[idx]
        v_len, t_len = self.v_len[rows], self.t_len[idx]
        length, n_tok = int(v_len.max()), int(t_len.max())  # host numbers: no device read
        labels = [self.dataset.labels(int(i), int(n)) for i, n in zip(idx, v_len)]
        width = self.dataset.max_windows if self.device.type == "cuda" else None  # as make_loader pads them
        span_targets, span_mask = pad_spans([lab["span_labels"] for lab in labels], width)
        sal = torch.zeros(len(idx), length)
        for b, lab in enumerate(labels):
            sal[b, : len(lab["saliency_all_labels"])] = lab["saliency_all_labels"]
        host = {  # the batch's one host-to-device transfer (small: indices, lengths, labels)
            "rows": torch.from_numpy(rows), "items": torch.from_numpy(idx), "v_len": torch.from_numpy(v_len),
            "t_len": torch.from_numpy(t_len), "span_targets": span_targets, "span_mask": span_mask,
            "saliency_pos_labels": torch.stack([lab["saliency_pos_labels"] for lab in labels]),
            "saliency_neg_labels": torch.stack([lab["saliency_neg_labels"] for lab in labels]),
            "saliency_all_labels": sal}
        dev = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        video = self.videos.index_select(0, dev["rows"])[:, :length].float()  # (B, T, Dv)
        text = self.texts.index_select(0, dev["items"])[:, :n_tok].float()  # (B, N, Dt)
        targets = {k: dev[k] for k in ("span_targets", "span_mask", "saliency_pos_labels", "saliency_neg_labels",
                                       "saliency_all_labels")}
        targets["span_labels"] = [lab["span_labels"] for lab in labels]  # host list, for matcher="scipy"
        recs = [self.dataset.records[int(i)] for i in idx]
        return {
            "video": video, "video_mask": torch.arange(length, device=self.device)[None] < dev["v_len"][:, None],
            "text": text, "text_mask": torch.arange(n_tok, device=self.device)[None] < dev["t_len"][:, None],
            "targets": targets,
            "meta": [{"qid": r["qid"], "vid": str(r["vid"]), "query": r.get("query", ""),
                      "duration": float(r["duration"])} for r in recs],
        }


__all__ = ["PreloadedLoader"]
