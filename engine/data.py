"""Datasets, feature reading, labels and batching (spec ``ld-detr-code.md`` §6, ``evaluation.md`` §1, §4, §5).

The feature contract and feature reading (on-disk layout, normalisation, TEF) live in :mod:`engine.features`,
the dataset check in :mod:`engine.data_check`; both are re-exported here.

Labels (``load_labels=True``): ``span_labels`` = windows / (T * clip_len), xx -> cxw; saliency by rule:
QVHighlights "all labels" (summed annotator scores), Charades/TACoS "sub as query" (binary GT clips), TVSum
(mean over annotators). Random picks use a ``numpy.random.Generator`` seeded by (seed, epoch, index).

Departures from the official loader (all harmless for well-formed data):

* windows are clamped to [0, 1] in (start, end) form before the cxw conversion (a window cut off by
  ``max_v_l`` keeps its visible part; one entirely past the cut is dropped);
* QVHighlights ``saliency_all_labels`` always has T entries: scores of clip ids >= T (cut off by ``max_v_l``)
  are dropped instead of growing the array by one slot, and the random positive is clamped to T-1 like the
  hard ones; ties for the hard pos/neg are broken by a stable sort (the later clip id wins the max, the
  earlier the min, as numpy's argsort does on short arrays);
* bad data raises :class:`DataError` naming the file and the key / qid instead of failing later.

CLI::

    python -m engine.data check --dataset qvhighlights --data-root FEATURES [--ann FILE ...]
    python -m engine.data synth --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from reference.span_utils import span_xx_to_cxw

from .atomic import save_json
from .data_check import CHECK_CATEGORIES, check_dataset, first_problem, format_report  # noqa: F401  (re-exported)
from .data_validate import record_problems, record_windows, validate_record, window_problems  # noqa: F401
from .features import (  # noqa: F401  (re-exported: importers use engine.data)
    DATASETS, NORM_EPS, DataError, FeatureSpec, canonical_dataset, feature_spec_for, find_feature_file,
    l2_normalize, prepare_text, prepare_video, read_array, read_array_shape, read_text_features,
    read_video_features, temporal_endpoint_features,
)

#: saliency-label rule per dataset (spec §6 "Labels per sample").
LABEL_RULES = {"qvhighlights": "all", "synthetic": "all", "charades": "sub_as_query", "tacos": "sub_as_query",
               "tvsum": "tvsum"}
N_PAIRS = 2  # saliency pos / neg indices per sample


def _few(items: Sequence[Any], n: int = 5) -> str:
    items = list(items)
    return repr(items[:n])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > n else "]")


# ---------------------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------------------
class Annotations(list):
    """A list of annotation dicts that remembers the file it came from (``.path``, for error messages)."""

    def __init__(self, records=(), path: str | os.PathLike | None = None):
        super().__init__(records)
        self.path = None if path is None else Path(path)


def find_split(root: str | os.PathLike, split: str) -> Path:
    """The one ``*{split}*.jsonl`` annotation file in ``root`` (DataError when there is none or several)."""
    root = Path(root)
    found = sorted(p for p in root.glob(f"*{split}*.jsonl") if p.is_file())
    if len(found) != 1:
        raise DataError(f"expected one *{split}*.jsonl annotation file in {root}, found {[p.name for p in found]}; "
                        f"pass --ann")
    return found[0]


def load_annotations(path: str | os.PathLike) -> Annotations:
    """Read a jsonl annotation file; ``DataError`` for a missing file, a malformed line, duplicate qids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    records = Annotations(path=path)
    try:
        _read_records(path, records)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    check_unique_qids(records, path)
    return records


def _read_records(path: Path, records: list) -> None:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in ("qid", "vid"):
                if key not in rec:
                    raise DataError(f"{path}:{lineno}: record has no {key!r} key (keys: {sorted(rec)})")
            records.append(rec)


def check_unique_qids(records: Sequence[dict], source: Any = None) -> None:
    seen, dups = set(), []
    for rec in records:
        q = rec["qid"]
        if q in seen and q not in dups:
            dups.append(q)
        seen.add(q)
    if dups:
        raise DataError(f"{source or 'annotations'}: {len(dups)} duplicate qid(s): {_few(dups)}")


# ---------------------------------------------------------------------------------------------------------
# Labels (spec §6 "Labels per sample")
# ---------------------------------------------------------------------------------------------------------
def span_labels_from_windows(windows: np.ndarray, ctx_l: int, clip_length: float, max_windows: int,
                             rng: np.random.Generator) -> torch.Tensor:
    """(n <= max_windows, 2) float32 normalised cxw: windows / (ctx_l * clip_len), clamped to [0, 1], xx -> cxw."""
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    if len(windows) > max_windows:
        windows = windows[rng.permutation(len(windows))[:max_windows]]
    xx = np.clip(windows / (ctx_l * clip_length), 0.0, 1.0)
    xx = xx[xx[:, 1] > xx[:, 0]]  # a window entirely past a max_v_l cut has nothing left
    return span_xx_to_cxw(torch.as_tensor(xx, dtype=torch.float32).reshape(-1, 2))


def saliency_labels_all(rel_clip_ids: Sequence[int], scores: Any, ctx_l: int, rng: np.random.Generator
                        ) -> tuple[list[int], list[int], np.ndarray]:
    """QVHighlights rule: pos = [highest summed score, random relevant], neg = [lowest, random irrelevant].

    ``saliency_all_labels`` (ctx_l,) = the summed annotator scores at the relevant clips, 0 elsewhere. When
    every clip is relevant the random pair copies the hard pair.
    """
    ids = np.asarray(rel_clip_ids, dtype=np.int64)
    agg = np.asarray(scores, dtype=np.float64).reshape(len(ids), -1).sum(1)  # (n_rel,)
    order = np.argsort(agg, kind="stable")  # increasing
    all_labels = np.zeros(ctx_l, dtype=np.float32)
    inside = ids < ctx_l
    all_labels[ids[inside]] = agg[inside]
    hard_pos = [int(min(ids[order[-1]], ctx_l - 1))]
    hard_neg = [int(min(ids[order[0]], ctx_l - 1))]
    easy_neg_pool = sorted(set(range(ctx_l)) - set(ids.tolist()))
    if easy_neg_pool:
        easy_pos = [int(min(rng.choice(ids), ctx_l - 1))]
        easy_neg = [int(rng.choice(easy_neg_pool))]
    else:
        easy_pos, easy_neg = hard_pos, hard_neg
    return hard_pos + easy_pos, hard_neg + easy_neg, all_labels


def saliency_labels_sub_as_query(window: Sequence[float], duration: float, ctx_l: int, rng: np.random.Generator
                                 ) -> tuple[list[int], list[int], np.ndarray]:
    """Charades / TACoS rule: 2 distinct random positives in the GT clips, 2 random negatives outside."""
    clip_len = duration / ctx_l
    gt_st = int(window[0] / clip_len)
    gt_ed = max(0, min(int(window[1] / clip_len), ctx_l) - 1)
    gt_st = min(gt_st, gt_ed)
    if gt_st != gt_ed:
        pos = [int(x) for x in rng.choice(np.arange(gt_st, gt_ed + 1), size=N_PAIRS, replace=False)]
    else:
        pos = [gt_st] * N_PAIRS
    neg_pool = np.concatenate([np.arange(0, gt_st), np.arange(gt_ed + 1, ctx_l)])
    if len(neg_pool) >= N_PAIRS:
        neg = [int(x) for x in rng.choice(neg_pool, size=N_PAIRS, replace=False)]
    else:
        neg = list(pos)
    all_labels = np.zeros(ctx_l, dtype=np.float32)
    all_labels[gt_st: gt_ed + 1] = 1.0
    return pos, neg, all_labels


def saliency_labels_tvsum(label: Any, ctx_l: int) -> tuple[list[int], list[int], np.ndarray]:
    """TVSum: per-clip mean over annotators; pos = the 2 highest clips, neg = the 2 lowest (stable ties)."""
    mean = np.asarray(label, dtype=np.float64).mean(axis=1)[:ctx_l]
    all_labels = np.zeros(ctx_l, dtype=np.float32)
    all_labels[: len(mean)] = mean
    order = np.argsort(mean, kind="stable")
    top = [int(order[-1]), int(order[-2] if len(order) > 1 else order[-1])]
    bottom = [int(order[0]), int(order[1] if len(order) > 1 else order[0])]
    return top, bottom, all_labels


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------
class MomentDataset(Dataset):
    """One item per annotation record: features read from ``root`` by ``spec``, labels by dataset rule.

    ``__getitem__`` returns a dict: ``qid, vid, query, duration`` (python values), ``video`` (T, Dv) float32,
    ``text`` (N, Dt) float32, and with ``load_labels``: ``span_labels`` (n, 2) cxw,
    ``saliency_pos_labels`` / ``saliency_neg_labels`` (2,) long, ``saliency_all_labels`` (T,) float32.
    Random picks come from ``numpy.random.default_rng([seed, epoch, index])``; :meth:`set_epoch` changes them
    (the epoch lives in shared memory, so persistent DataLoader workers see it). ``cache=True`` keeps the
    processed features in memory (per worker process): for small datasets such as the synthetic one.
    """

    def __init__(self, annotations: Sequence[dict] | str | os.PathLike, root: str | os.PathLike, spec: FeatureSpec,
                 dataset: str = "qvhighlights", load_labels: bool = True, max_windows: int = 5, seed: int = 0,
                 cache: bool = False):
        if isinstance(annotations, (str, os.PathLike)):
            annotations = load_annotations(annotations)
        self.source = getattr(annotations, "path", None)
        self.records = list(annotations)
        self.root = Path(root)
        self.spec = spec
        self.dataset = canonical_dataset(dataset)
        self.rule = LABEL_RULES[self.dataset]
        self.load_labels = load_labels
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        self.max_windows = max_windows
        self.seed = int(seed)
        self.cache = cache
        self._video_cache: dict[str, np.ndarray] = {}
        self._text_cache: dict[Any, np.ndarray] = {}
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        for rec in self.records:
            for key in ("qid", "vid"):
                if key not in rec:
                    raise DataError(f"{self.source or 'annotations'}: record without {key!r}: {str(rec)[:80]}")
        check_unique_qids(self.records, self.source)
        for rec in self.records:
            validate_record(rec, self.rule, load_labels, self.source, clip_length=spec.clip_length)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        qid, vid = rec["qid"], str(rec["vid"])
        video = self._video_cache.get(vid) if self.cache else None
        if video is None:
            video = read_video_features(self.root, vid, self.spec)
            if self.cache:
                self._video_cache[vid] = video
        item: dict[str, Any] = {"qid": qid, "vid": vid, "query": rec.get("query", ""),
                                "duration": float(rec["duration"])}
        item["video"] = torch.from_numpy(np.array(video) if self.cache else video)  # never hand out the cache
        text = self._text_cache.get(qid) if self.cache else None
        if text is None:
            text = read_text_features(self.root, qid, self.spec)
            if self.cache:
                self._text_cache[qid] = text
        item["text"] = torch.from_numpy(np.array(text) if self.cache else text)
        if self.load_labels:
            item.update(self.labels(index, len(video)))
        return item

    def labels(self, index: int, ctx_l: int) -> dict[str, torch.Tensor]:
        """The label tensors of record ``index`` for a video of ``ctx_l`` clips."""
        rec, rng = self.records[index], self.rng(index)
        if self.rule == "tvsum":
            spans = torch.zeros(0, 2)
            pos, neg, all_labels = saliency_labels_tvsum(rec["label"], ctx_l)
        else:
            windows = record_windows(rec)
            spans = span_labels_from_windows(windows, ctx_l, self.spec.clip_length, self.max_windows, rng)
            if self.rule == "all":
                pos, neg, all_labels = saliency_labels_all(rec["relevant_clip_ids"], rec["saliency_scores"], ctx_l, rng)
            else:
                pos, neg, all_labels = saliency_labels_sub_as_query(windows[0], float(rec["duration"]), ctx_l, rng)
        return {"span_labels": spans, "saliency_pos_labels": torch.tensor(pos, dtype=torch.long),
                "saliency_neg_labels": torch.tensor(neg, dtype=torch.long),
                "saliency_all_labels": torch.from_numpy(all_labels)}


# ---------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------
def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (L_i, ...) tensors to (B, L_max, ...) and return it with a (B, L_max) bool mask."""
    lengths = torch.tensor([s.shape[0] for s in seqs])
    out = seqs[0].new_zeros((len(seqs), int(lengths.max())) + tuple(seqs[0].shape[1:]))
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    mask = torch.arange(out.shape[1])[None] < lengths[:, None]  # (B, L)
    return out, mask


def pad_spans(spans: list[torch.Tensor], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """List of B (n_b, 2) span tensors -> zero-padded (B, W, 2) and a (B, W) bool mask (True = a real span).

    ``width`` W defaults to the largest n_b (at least 1); a sample with more than W spans is an error."""
    most = max([0] + [len(t) for t in spans])
    width = max(1, most) if width is None else width
    if most > width:
        raise ValueError(f"a sample has {most} span labels, more than the padded width {width} (max_windows)")
    out = torch.zeros(len(spans), width, 2)
    mask = torch.zeros(len(spans), width, dtype=torch.bool)
    for b, t in enumerate(spans):
        out[b, :len(t)] = t
        mask[b, :len(t)] = True
    return out, mask


def collate(items: list[dict[str, Any]], max_windows: int | None = None) -> dict[str, Any]:
    """Batch :class:`MomentDataset` items.

    Returns ``video`` (B, T, Dv) zero-padded, ``video_mask`` (B, T) bool (True = valid), ``text`` (B, N, Dt),
    ``text_mask`` (B, N) bool, ``meta`` (list of {qid, vid, query, duration}) and, when
    the items carry labels, ``targets`` = {``span_labels``: list of B (n_b, 2) cxw tensors, the same padded:
    ``span_targets`` (B, W, 2) and ``span_mask`` (B, W) bool with W = ``max_windows`` (default: the batch's
    most), ``saliency_pos_labels`` / ``saliency_neg_labels``: (B, 2) long, ``saliency_all_labels``: (B, T) float}.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    batch: dict[str, Any] = {}
    batch["video"], batch["video_mask"] = _pad([it["video"] for it in items])
    batch["text"], batch["text_mask"] = _pad([it["text"] for it in items])
    labelled = ["span_labels" in it for it in items]
    if any(labelled):
        if not all(labelled):
            raise ValueError("collate: some items have labels and some do not")
        for it in items:
            if it["saliency_all_labels"].shape[0] != it["video"].shape[0]:
                raise ValueError(f"collate: qid {it['qid']!r} has {it['saliency_all_labels'].shape[0]} saliency "
                                 f"labels for {it['video'].shape[0]} clips")
        sal, _ = _pad([it["saliency_all_labels"] for it in items])  # (B, T), zero-padded
        span_targets, span_mask = pad_spans([it["span_labels"] for it in items], max_windows)
        batch["targets"] = {
            "span_labels": [it["span_labels"] for it in items],
            "span_targets": span_targets,
            "span_mask": span_mask,
            "saliency_pos_labels": torch.stack([it["saliency_pos_labels"] for it in items]),
            "saliency_neg_labels": torch.stack([it["saliency_neg_labels"] for it in items]),
            "saliency_all_labels": sal,
        }
    batch["meta"] = [{k: it[k] for k in ("qid", "vid", "query", "duration")} for it in items]
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from (seed, epoch): resumable and identical across runs.

    ``set_epoch(e)`` fixes the epoch; without it each pass moves on to the next epoch by itself.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        self.epoch += 1
        return iter(order)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0, seed: int = 0,
                device: str | torch.device | None = None, distributed: bool = False,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader with :func:`collate`, a seeded order, pinned memory only for CUDA, persistent workers.

    ``distributed=True`` shards with a ``DistributedSampler`` (call ``loader.sampler.set_epoch(e)``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = EpochShuffleSampler(len(dataset), seed) if shuffle else None
    generator = torch.Generator().manual_seed(int(seed))
    pin = device is not None and torch.device(device).type == "cuda"
    # span targets padded to max_windows (static shapes) on CUDA; to the batch's most elsewhere, where a
    # smaller width makes the exact device matcher cheaper (it enumerates Q!/(Q-W)! maps)
    windows = getattr(dataset, "max_windows", None) if pin else None
    collate_fn = functools.partial(collate, max_windows=windows)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin, drop_last=drop_last, generator=generator,
                      persistent_workers=num_workers > 0, worker_init_fn=_worker_init if num_workers > 0 else None)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import cli

    p = cli.parser("python -m engine.data", "Dataset tools: check a feature root and its annotations, or write the "
                   "synthetic dataset.",
                   "python -m engine.data check --dataset qvhighlights --data-root features/qvhighlight")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{check,synth}")
    c = sub.add_parser("check", help="scan annotations + features and report problems (exit 0 clean, 1 problems, "
                                     "2 unusable input)", formatter_class=cli.HelpFormatter,
                       description="Scan annotations and features with the loader's own validator; every feature "
                                   "file is read once (results cached, so a rerun only reads changed files).",
                       epilog="example:\n  python -m engine.data check --dataset qvhighlights --data-root "
                              "features/qvhighlight --ann data/highlight_val_release.jsonl\n\n"
                              "exit codes: 0 clean, 1 problems found, 2 bad input")
    c.add_argument("--dataset", required=True, choices=DATASETS, help="dataset format (aliases: hl, charadesSTA)",
                   type=_dataset_arg)
    c.add_argument("--data-root", "--root", dest="data_root", required=True, type=Path,
                   help="feature root (slowfast_features/, clip_features/, ...)")
    c.add_argument("--ann", nargs="+", type=Path, default=None,
                   help="annotation jsonl files (default: every *.jsonl in --data-root)")
    c.add_argument("--max-video-len", "--max-v-l", dest="max_video_len", type=int, default=None,
                   help="override the clip cap (<= 0: none; default: the dataset's)")
    c.add_argument("--examples", type=int, default=5, help="examples shown per problem kind")
    c.add_argument("--out", "--json", dest="out", type=Path, default=None, help="a file: the full report as JSON")
    c.add_argument("--no-cache", action="store_true", help="rescan every feature file (ignore the scan cache)")
    cli.add_device(c, note="the files are read and checked with numpy")
    cli.add_quiet(c)
    s = sub.add_parser("synth", help="write the synthetic QVHighlights-format dataset", formatter_class=cli.HelpFormatter,
                       description="Write the built-in synthetic dataset (features + annotations) into a folder.",
                       epilog="example:\n  python -m engine.data synth --out data/synthetic\n\n"
                              "exit codes: 0 ok, 2 bad input")
    s.add_argument("--out", required=True, type=Path, help="a folder: features and annotation files go there")
    s.add_argument("--n-train", type=int, default=None, help="training queries (default: the generator's)")
    s.add_argument("--n-val", type=int, default=None, help="validation queries (default: the generator's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="regenerate even when the manifest matches")
    cli.add_device(s, note="the dataset is generated with numpy")
    cli.add_quiet(s)
    return p


def _dataset_arg(value: str) -> str:
    try:
        return canonical_dataset(value)
    except DataError:
        return value  # argparse's choices check names the valid ones


def main(argv: Sequence[str] | None = None) -> int:
    from . import cli

    args = build_parser().parse_args(argv)
    try:
        cli.resolve_device(args.device)  # checked only (no model runs here), before any file is read or written
    except ValueError as e:
        return cli.fail(e)
    if args.cmd == "synth":
        from .synthetic import ensure_synthetic_dataset, make_synthetic_dataset

        kwargs = {k: v for k, v in (("n_train", args.n_train), ("n_val", args.n_val)) if v is not None}
        try:
            if args.force:
                make_synthetic_dataset(args.out, seed=args.seed, **kwargs)
            else:
                ensure_synthetic_dataset(args.out, seed=args.seed, **kwargs)
        except OSError as e:
            return cli.fail(cli.os_error_line(e))
        except ValueError as e:
            return cli.fail(e)
        if not args.quiet:
            print(f"synthetic dataset ready in {args.out}")
        return 0
    root = args.data_root
    try:
        if args.ann:
            ann = list(args.ann)
        else:
            ann = sorted(p for p in root.glob("*.jsonl") if p.is_file()) if root.is_dir() else []
        overrides = {} if args.max_video_len is None else {"max_v_l": args.max_video_len}
        spec = feature_spec_for(args.dataset, root if root.is_dir() else None, **overrides)
        report = check_dataset(args.dataset, root, ann, spec, max_examples=args.examples,
                               progress=not args.quiet, cache_dir=False if args.no_cache else None)
        if args.out is not None:
            save_json(report, args.out, indent=2)
    except KeyboardInterrupt:
        print("\ninterrupted: the files scanned so far are cached; a rerun continues from there", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except OSError as e:
        return cli.fail(cli.os_error_line(e))
    except DataError as e:
        return cli.fail(e)
    print(format_report(report))
    return 0 if report["clean"] else 1


__all__ = [
    "DATASETS", "LABEL_RULES", "DataError", "FeatureSpec", "feature_spec_for", "canonical_dataset",
    "read_array", "read_array_shape", "find_feature_file", "l2_normalize", "temporal_endpoint_features",
    "read_video_features", "read_text_features", "Annotations", "load_annotations",
    "validate_record", "window_problems", "span_labels_from_windows", "saliency_labels_all",
    "saliency_labels_sub_as_query", "saliency_labels_tvsum", "MomentDataset", "collate", "EpochShuffleSampler",
    "make_loader", "check_dataset", "format_report", "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
