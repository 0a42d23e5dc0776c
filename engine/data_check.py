"""The dataset check behind ``python -m engine.data check``: scan annotations + feature headers, count problems.

Nothing is loaded beyond the .npy headers; the report lists counts and the first examples per category.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from .features import DataError, FeatureSpec, _candidates, canonical_dataset, feature_spec_for, read_array_shape

CHECK_CATEGORIES = {
    "missing_video": "missing video feature files",
    "missing_text": "missing text feature files",
    "missing_audio": "missing audio feature files",
    "unreadable": "unreadable / corrupt feature files",
    "dim_mismatch": "feature dim mismatches",
    "duration_mismatch": "duration vs clip count inconsistencies",
    "bad_window": "windows empty or outside the duration",
}


class _Report:
    def __init__(self, max_examples: int):
        self.max_examples = max_examples
        self.problems = {k: {"count": 0, "examples": []} for k in CHECK_CATEGORIES}

    def add(self, category: str, example: dict) -> None:
        entry = self.problems[category]
        entry["count"] += 1
        if len(entry["examples"]) < self.max_examples:
            entry["examples"].append(example)


def _probe(folder: Path, stem: str, key: str, expected: int | None, what: str, report: _Report,
           missing: str) -> tuple[int, int] | None:
    """(length, dim) of one feature file from its header, recording any problem; None when unusable."""
    tried = _candidates(folder, stem)
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        report.add(missing, {"what": what, "tried": [str(p) for p in tried]})
        return None
    try:
        shape = read_array_shape(path, key)
    except DataError as e:
        report.add("unreadable", {"file": str(path), "error": str(e)})
        return None
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        report.add("dim_mismatch", {"file": str(path), "expected": "(length, channels)", "got": list(shape)})
        return None
    if expected is not None and shape[1] != expected:
        report.add("dim_mismatch", {"file": str(path), "expected": expected, "got": shape[1]})
    return shape[0], shape[1]


def check_dataset(dataset_name: str, root: str | os.PathLike, annotation_files: Sequence[str | os.PathLike],
                  spec: FeatureSpec | None = None, max_examples: int = 5, progress: bool = True) -> dict[str, Any]:
    """Scan annotations + features; return counts and first examples of every problem (nothing is loaded
    beyond the .npy headers).

    Raises ``DataError`` when the input is unusable (unknown dataset, missing root, unreadable annotations).
    """
    # imported here, not at the top: engine.data imports this module for its CLI and re-exports
    from .data import LABEL_RULES, load_annotations, validate_record, window_problems

    dataset = canonical_dataset(dataset_name)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"feature root {root} is not a folder")
    if not annotation_files:
        raise DataError(f"no annotation files given and no *.jsonl in {root}")
    spec = spec or feature_spec_for(dataset, root)
    rule = LABEL_RULES[dataset]
    report = _Report(max_examples)
    files, by_vid, n_queries = [], {}, 0
    qid_records = []
    for f in annotation_files:
        records = load_annotations(f)
        files.append({"file": str(f), "queries": len(records)})
        for rec in records:
            validate_record(rec, rule, load_labels=False, source=f)
            by_vid.setdefault(str(rec["vid"]), []).append(rec)
            qid_records.append(rec)
            for msg in window_problems(rec):
                report.add("bad_window", {"file": str(f), "qid": rec["qid"], "problem": msg})
        n_queries += len(records)
    truncated = 0
    cap = spec.max_video_len
    for vid, recs in tqdm(by_vid.items(), desc="videos", disable=not progress, leave=False):
        lengths = []
        for i, vdir in enumerate(spec.video_dirs):
            parts = spec.parts(vdir)
            expected = spec.video_dims[i] if spec.video_dims is not None and len(parts) == 1 else None
            probes = [_probe(root / vdir, p.format(vid=vid), spec.video_key, expected,
                             f"vid {vid!r} ({vdir})", report, "missing_video") for p in parts]
            if all(probes):
                if len(parts) > 1 and spec.video_dims is not None and sum(p[1] for p in probes) != spec.video_dims[i]:
                    report.add("dim_mismatch", {"vid": vid, "dir": vdir, "expected": spec.video_dims[i],
                                                "got": sum(p[1] for p in probes)})
                lengths.append(min(p[0] for p in probes))
        if spec.audio_dir is not None:
            probe = _probe(root / spec.audio_dir, vid, spec.video_key, spec.audio_dim, f"vid {vid!r} (audio)",
                           report, "missing_audio")
            if probe:
                lengths.append(probe[0])
        if len(lengths) != len(spec.video_dirs) + (spec.audio_dir is not None):
            continue
        t_raw = min(lengths)
        if cap is not None and t_raw > cap:
            truncated += 1
        for rec in recs:
            duration = float(rec["duration"])
            if rule == "tvsum" and rec.get("label") is not None:
                n_rows = len(rec["label"])
                if abs(n_rows - t_raw) > 1:
                    report.add("duration_mismatch", {"qid": rec["qid"], "vid": vid, "label_rows": n_rows,
                                                     "clips": t_raw})
                continue
            if abs(duration - t_raw * spec.clip_length) > spec.clip_length:
                ex = {"qid": rec["qid"], "vid": vid, "duration": duration, "clips": t_raw,
                      "clips_x_clip_length": t_raw * spec.clip_length}
                if cap is not None and t_raw > cap:
                    ex["note"] = f"also truncated to max_v_l={cap} clips = {cap * spec.clip_length:g} s"
                report.add("duration_mismatch", ex)
    for rec in tqdm(qid_records, desc="queries", disable=not progress, leave=False):
        stem = spec.text_pattern.format(qid=rec["qid"])
        _probe(root / spec.text_dir, stem, spec.text_key, spec.text_dim, f"qid {rec['qid']!r}", report,
               "missing_text")
    n_problems = sum(p["count"] for p in report.problems.values())
    return {"dataset": dataset, "root": str(root), "files": files, "queries": n_queries, "videos": len(by_vid),
            "spec": spec.to_dict(), "videos_truncated_by_max_v_l": truncated, "problems": report.problems,
            "n_problems": n_problems, "clean": n_problems == 0}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"dataset {report['dataset']} at {report['root']}: {report['queries']} queries, "
             f"{report['videos']} videos in {len(report['files'])} file(s)"]
    spec = report["spec"]
    lines.append(f"contract: video {spec['video_dirs']} dims {spec['video_dims']}, text {spec['text_dir']}/"
                 f"{spec['text_pattern']} dim {spec['text_dim']}, clip_length {spec['clip_length']}, "
                 f"max_v_l {spec['max_v_l']}")
    if report["videos_truncated_by_max_v_l"]:
        lines.append(f"note: {report['videos_truncated_by_max_v_l']} videos are longer than max_v_l and get truncated")
    for key, title in CHECK_CATEGORIES.items():
        entry = report["problems"][key]
        if entry["count"]:
            lines.append(f"{title}: {entry['count']}")
            lines += [f"  {json.dumps(ex)}" for ex in entry["examples"]]
    lines.append("clean" if report["clean"] else f"{report['n_problems']} problem(s) found")
    return "\n".join(lines)
