"""The dataset check behind ``python -m engine.data check`` and ``engine.train``'s up-front validation.

Annotations go through the loader's own validator (:mod:`engine.data_validate`); every feature file is read
once to check its shape, its dim against the contract and that it is finite and non-empty. The per-file
results are cached (keyed by path, size and mtime) in ``$LD_DETR_CACHE/check/`` (default
``~/.cache/ld_detr/check/``), so a rerun over ~8 GB of features only reads the files that changed. The
report lists counts and the first examples per category.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from .atomic import save_json
from .features import DataError, FeatureSpec, _candidates, canonical_dataset, feature_spec_for, read_array

CHECK_CATEGORIES = {
    "empty_file": "annotation files without any record",
    "bad_annotation": "records with a missing / malformed duration or labels",
    "bad_window": "windows empty, reversed or outside the duration",
    "bad_clip_ids": "relevant_clip_ids outside the video's clips",
    "too_long": "videos longer than max_v_l (the model would see only their beginning)",
    "missing_video": "missing video feature files",
    "missing_text": "missing text feature files",
    "unreadable": "unreadable / corrupt feature files",
    "dim_mismatch": "feature dim mismatches",
    "nonfinite": "feature files with NaN/inf values",
    "empty_features": "feature files with zero rows (e.g. a query with zero tokens)",
    "duration_mismatch": "duration vs clip count inconsistencies",
}
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("LD_DETR_CACHE", Path.home() / ".cache" / "ld_detr")) / "check"


class _Report:
    def __init__(self, max_examples: int):
        self.max_examples = max_examples
        self.problems = {k: {"count": 0, "examples": []} for k in CHECK_CATEGORIES}

    def add(self, category: str, example: dict) -> None:
        entry = self.problems[category]
        entry["count"] += 1
        if len(entry["examples"]) < self.max_examples:
            entry["examples"].append(example)


class ScanCache:
    """Per-file scan results ``{path: {size, mtime_ns, key, shape, finite, error}}``, one JSON per root."""

    def __init__(self, root: Path, folder: Path | None):
        self.path = None if folder is None else folder / f"{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]}.json"
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == CACHE_VERSION:
                    self.entries = data["files"]
            except (OSError, ValueError, KeyError, TypeError):
                self.entries = {}  # a broken cache is rebuilt

    def scan(self, path: Path, key: str) -> dict:
        st = path.stat()
        hit = self.entries.get(str(path))
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns and hit["key"] == key:
            return hit
        entry: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "key": key, "shape": None,
                                 "finite": None, "error": None}
        try:
            arr = read_array(path, key)
            entry["shape"] = [int(s) for s in arr.shape]
            entry["finite"] = bool(np.isfinite(arr).all()) if np.issubdtype(arr.dtype, np.number) else False
        except DataError as e:
            entry["error"] = str(e)
        self.entries[str(path)] = entry
        self.dirty = True
        return entry

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            save_json({"version": CACHE_VERSION, "files": self.entries}, self.path, indent=None)
        except OSError:
            pass  # an unwritable cache folder only costs the next run a rescan


def _probe(folder: Path, stem: str, key: str, expected: int | None, what: str, report: _Report, missing: str,
           cache: ScanCache) -> tuple[int, int] | None:
    """(length, dim) of one feature file, recording any problem; None when unusable."""
    tried = _candidates(folder, stem)
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        report.add(missing, {"what": what, "tried": [str(p) for p in tried]})
        return None
    entry = cache.scan(path, key)
    if entry["error"] is not None:
        report.add("unreadable", {"file": str(path), "error": entry["error"]})
        return None
    shape = list(entry["shape"])
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        report.add("dim_mismatch", {"file": str(path), "expected": "(length, channels)", "got": shape})
        return None
    if shape[0] == 0:
        report.add("empty_features", {"file": str(path), "what": what})
        return None
    if not entry["finite"]:
        report.add("nonfinite", {"file": str(path), "what": what})
    if expected is not None and shape[1] != expected:
        report.add("dim_mismatch", {"file": str(path), "expected": expected, "got": shape[1]})
    return shape[0], shape[1]


def _check_annotations(files: Sequence, rule: str, spec: FeatureSpec, labels: bool | None, report: _Report):
    """Load every file, run the shared record validator; returns (file summaries, records by vid, records)."""
    from .data import load_annotations
    from .data_validate import record_problems

    summaries, by_vid, records_all = [], {}, []
    for f in files:
        records = load_annotations(f)
        summaries.append({"file": str(f), "queries": len(records)})
        if not records:
            report.add("empty_file", {"file": str(f)})
        label_key = "label" if rule == "tvsum" else "relevant_windows"
        need = labels if labels is not None else any(r.get(label_key) is not None for r in records)
        for rec in records:
            for category, msg in record_problems(rec, rule, need, spec.clip_length, spec.max_v_l):
                report.add(category, {"file": str(f), "qid": rec["qid"], "problem": msg})
            try:
                float(rec["duration"])
            except (KeyError, TypeError, ValueError):
                continue  # already reported; no duration to compare with the features
            by_vid.setdefault(str(rec["vid"]), []).append(rec)
            records_all.append(rec)
    return summaries, by_vid, records_all


def check_dataset(dataset_name: str, root: str | os.PathLike, annotation_files: Sequence[str | os.PathLike],
                  spec: FeatureSpec | None = None, max_examples: int = 5, progress: bool = True,
                  labels: bool | None = None, cache_dir: str | os.PathLike | None | bool = None) -> dict[str, Any]:
    """Scan annotations + features; return counts and first examples of every problem.

    ``labels``: True = every record must carry its training labels, False = none checked, None = a file whose
    records carry labels must have them everywhere (a test split without labels passes). ``cache_dir``: where
    the per-file scan cache lives (None: :func:`default_cache_dir`; False: no cache).
    Raises ``DataError`` when the input is unusable (unknown dataset, missing root, unreadable annotations).
    """
    from .data import LABEL_RULES

    dataset = canonical_dataset(dataset_name)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"feature root {root} is not a folder")
    if not annotation_files:
        raise DataError(f"no annotation files given and no *.jsonl in {root}")
    spec = spec or feature_spec_for(dataset, root)
    rule = LABEL_RULES[dataset]
    report = _Report(max_examples)
    cache = ScanCache(root, None if cache_dir is False else Path(cache_dir or default_cache_dir()))
    files, by_vid, qid_records = _check_annotations(annotation_files, rule, spec, labels, report)
    truncated = 0
    cap = spec.max_video_len
    try:
        for vid, recs in tqdm(by_vid.items(), desc="videos", disable=not progress, leave=False):
            t_raw = _video_length(root, vid, spec, report, cache)
            if t_raw is None:
                continue
            truncated += int(cap is not None and t_raw > cap)
            for rec in recs:
                _check_duration(rec, vid, t_raw, rule, spec, report)
        for rec in tqdm(qid_records, desc="queries", disable=not progress, leave=False):
            stem = spec.text_pattern.format(qid=rec["qid"])
            _probe(root / spec.text_dir, stem, spec.text_key, spec.text_dim, f"qid {rec['qid']!r}", report,
                   "missing_text", cache)
    finally:
        cache.save()  # an interrupted scan keeps what it read
    n_problems = sum(p["count"] for p in report.problems.values())
    return {"dataset": dataset, "root": str(root), "files": files, "queries": sum(f["queries"] for f in files),
            "videos": len(by_vid), "spec": spec.to_dict(), "videos_truncated_by_max_v_l": truncated,
            "problems": report.problems, "n_problems": n_problems, "clean": n_problems == 0}


def _video_length(root: Path, vid: str, spec: FeatureSpec, report: _Report, cache: ScanCache) -> int | None:
    lengths = []
    for i, vdir in enumerate(spec.video_dirs):
        parts = spec.parts(vdir)
        expected = spec.video_dims[i] if spec.video_dims is not None and len(parts) == 1 else None
        probes = [_probe(root / vdir, p.format(vid=vid), spec.video_key, expected, f"vid {vid!r} ({vdir})", report,
                         "missing_video", cache) for p in parts]
        if all(probes):
            if len(parts) > 1 and spec.video_dims is not None and sum(p[1] for p in probes) != spec.video_dims[i]:
                report.add("dim_mismatch", {"vid": vid, "dir": vdir, "expected": spec.video_dims[i],
                                            "got": sum(p[1] for p in probes)})
            lengths.append(min(p[0] for p in probes))
    if len(lengths) != len(spec.video_dirs):
        return None
    return min(lengths)


def _check_duration(rec: dict, vid: str, t_raw: int, rule: str, spec: FeatureSpec, report: _Report) -> None:
    cap = spec.max_video_len
    if rule == "tvsum":
        if isinstance(rec.get("label"), list) and abs(len(rec["label"]) - t_raw) > 1:
            report.add("duration_mismatch", {"qid": rec["qid"], "vid": vid, "label_rows": len(rec["label"]),
                                             "clips": t_raw})
        return
    duration = float(rec["duration"])
    if abs(duration - t_raw * spec.clip_length) > spec.clip_length:
        ex = {"qid": rec["qid"], "vid": vid, "duration": duration, "clips": t_raw,
              "clips_x_clip_length": t_raw * spec.clip_length}
        if cap is not None and t_raw > cap:
            ex["note"] = f"also truncated to max_v_l={cap} clips = {cap * spec.clip_length:g} s"
        report.add("duration_mismatch", ex)


def first_problem(report: dict[str, Any]) -> str:
    """One line: the first problem of the first non-empty category, and how many there are in all."""
    for key, title in CHECK_CATEGORIES.items():
        entry = report["problems"][key]
        if entry["count"]:
            ex = entry["examples"][0]
            where = ex.get("file", "")
            if "qid" in ex:
                where += f"{': ' if where else ''}qid {ex['qid']!r}"
            detail = ex.get("problem") or ex.get("error") or ex.get("what") or json.dumps(ex)
            more = f" ({report['n_problems']} problem(s) in all)" if report["n_problems"] > 1 else ""
            return f"{title}: {where}{': ' if where else ''}{detail}{more}"
    return "clean"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"dataset {report['dataset']} at {report['root']}: {report['queries']} queries, "
             f"{report['videos']} videos in {len(report['files'])} file(s)"]
    spec = report["spec"]
    lines.append(f"contract: video {spec['video_dirs']} dims {spec['video_dims']}, text {spec['text_dir']}/"
                 f"{spec['text_pattern']} dim {spec['text_dim']}, clip_length {spec['clip_length']}, "
                 f"max_v_l {spec['max_v_l']}")
    if report["videos_truncated_by_max_v_l"]:
        lines.append(f"note: {report['videos_truncated_by_max_v_l']} videos have more feature rows than max_v_l "
                     f"and get truncated")
    for key, title in CHECK_CATEGORIES.items():
        entry = report["problems"][key]
        if entry["count"]:
            lines.append(f"{title}: {entry['count']}")
            lines += [f"  {json.dumps(ex)}" for ex in entry["examples"]]
    lines.append("clean" if report["clean"] else f"{report['n_problems']} problem(s) found")
    return "\n".join(lines)
