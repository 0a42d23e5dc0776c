"""engine.evaluate accepts what the official QVHighlights evaluator accepts (spec evaluation.md §1, §2.5):
saliency lists of any length are padded / truncated (with a note naming the count; ``--strict`` refuses),
a first record without a block's key skips that block with a note naming the disagreeing record, and the
CLI's hints name CLI flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from engine.evaluate import EvaluationNote, evaluate_qvhighlights, evaluate_tvsum, load_jsonl, main

from conftest import SHARED
from test_evaluate import _flat

REPO = Path(__file__).resolve().parents[1]
QVH = SHARED / "data" / "qvhighlights"


@pytest.fixture(scope="module")
def official():
    return (load_jsonl(QVH / "sample_val_preds.jsonl"), load_jsonl(QVH / "highlight_val_release.jsonl"),
            json.loads((QVH / "sample_val_preds_metrics_raw.json").read_text()))


def _notes(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, EvaluationNote)]


def test_longer_saliency_lists_give_the_official_numbers(official):
    """Every list 7 scores longer (values below the query's max, so the arg-max is unchanged): the official
    evaluator truncates them and reports the shipped numbers; so must we, saying how many were truncated."""
    sub, gt, expected = official
    longer = [{**r, "pred_saliency_scores": r["pred_saliency_scores"] + [min(r["pred_saliency_scores"]) - 1.0] * 7}
              for r in sub]
    got, notes = _notes(evaluate_qvhighlights, longer, gt)
    assert dict(_flat(got)) == dict(_flat(expected))
    assert len(notes) == 1 and f"{len(sub)} queries with more saliency scores than clips (truncated)" in notes[0]


def test_shorter_saliency_lists_are_padded_with_zeros(official):
    """Lists cut 5 short are scored as the official evaluator scores them: HL-mAP on the list right-padded
    with 0.0 (the file with the zeros written out is the reference), HIT@1 at the arg-max of the list as
    given (§2.5: over the whole predicted list, so written-out zeros could move it)."""
    sub, gt, _ = official
    n_clips = {g["qid"]: int(g["duration"] / 2) for g in gt}
    cut = [{**r, "pred_saliency_scores": r["pred_saliency_scores"][:-5]} if i % 3 == 0 else r for i, r in enumerate(sub)]
    padded = [{**r, "pred_saliency_scores": (r["pred_saliency_scores"] + [0.0] * n_clips[r["qid"]])[: n_clips[r["qid"]]]}
              for r in cut]
    got, notes = _notes(evaluate_qvhighlights, cut, gt)
    ref, _ = _notes(evaluate_qvhighlights, padded, gt)
    maps = lambda m: {k: v["HL-mAP"] for k, v in m.items() if k.startswith("HL-")}  # noqa: E731
    assert maps(got) == maps(ref) and maps(got) != maps(evaluate_qvhighlights(sub, gt))
    assert got["full"] == ref["full"]
    n_short = sum(1 for r in cut if len(r["pred_saliency_scores"]) < n_clips[r["qid"]])
    assert n_short > len(sub) // 3 and f"{n_short} queries with fewer saliency scores than clips" in notes[0]


def test_strict_refuses_what_the_default_pads(official):
    sub, gt, expected = official
    cut = [dict(r) for r in sub]
    cut[4]["pred_saliency_scores"] = cut[4]["pred_saliency_scores"][:-3]
    with pytest.raises(ValueError, match=rf"qid {cut[4]['qid']}: pred_saliency_scores has .*--strict"):
        evaluate_qvhighlights(cut, gt, strict=True)
    # the shipped file (13 queries one short) is within the tolerance even under --strict
    assert dict(_flat(evaluate_qvhighlights(sub, gt, strict=True))) == dict(_flat(expected))


def test_first_record_without_saliency_names_the_disagreeing_record(official):
    sub, gt, expected = official
    first = {k: v for k, v in sub[0].items() if k != "pred_saliency_scores"}
    got, notes = _notes(evaluate_qvhighlights, [first] + sub[1:], gt)
    assert not any(k.startswith("HL") for k in got) and got["full"] == expected["full"]  # HL skipped, MR kept
    assert len(notes) == 1 and f"(qid {sub[0]['qid']}) has no 'pred_saliency_scores'" in notes[0]
    assert f"qid {sub[1]['qid']} has it" in notes[0]
    with pytest.raises(ValueError, match=r"--strict refuses"):
        evaluate_qvhighlights([first] + sub[1:], gt, strict=True)
    first = {k: v for k, v in sub[0].items() if k != "pred_relevant_windows"}
    got, notes = _notes(evaluate_qvhighlights, [first] + sub[1:], gt)
    assert "full" not in got and "HL-min-Fair" in got and "the MR block is skipped" in notes[0]


def test_later_record_without_saliency_names_the_first_record():
    gt = [{"qid": q, "duration": 4, "relevant_windows": [[0, 2]], "relevant_clip_ids": [0],
           "saliency_scores": [[4, 4, 4]]} for q in (7, 8)]
    sub = [{"qid": 7, "pred_saliency_scores": [1.0, 0.0]}, {"qid": 8}]
    with pytest.raises(ValueError, match=r"qid 8: submission record lacks 'pred_saliency_scores' \(the first "
                                         r"record, qid 7, has it"):
        evaluate_qvhighlights(sub, gt)


def test_tvsum_truncates_and_notes():
    gt = [{"qid": "v", "domain": "BK", "label": [[1, 2], [3, 1], [0, 0], [2, 2], [1, 1], [3, 3]]}]
    base = evaluate_tvsum([{"qid": "v", "pred_saliency_scores": [0.5, 0.1, 0.3, 0.9, 0.2, 0.4]}], gt)
    got, notes = _notes(evaluate_tvsum, [{"qid": "v", "pred_saliency_scores": [0.5, 0.1, 0.3, 0.9, 0.2, 0.4, 0, 0, 0]}], gt)
    assert got == base and "1 query with more saliency scores than clips (truncated)" in notes[0]
    with pytest.raises(ValueError, match="--strict"):
        evaluate_tvsum([{"qid": "v", "pred_saliency_scores": [0.5, 0.1]}], gt, strict=True)


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_prints_the_padding_note_and_strict_exits_2(tmp_path, official, capsys):
    sub, gt, expected = official
    longer = [{**r, "pred_saliency_scores": r["pred_saliency_scores"] + [-9.0] * 3} for r in sub]
    sp = _write(tmp_path / "s.jsonl", longer)
    assert main(["--submission", str(sp), "--ann", str(QVH / "highlight_val_release.jsonl")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == expected["brief"]
    assert err.startswith(f"note: {len(sub)} queries with more saliency scores than clips (truncated)")
    assert main(["--submission", str(sp), "--gt", str(QVH / "highlight_val_release.jsonl"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: qid ") and "--strict accepts at most 1 off" in err and len(err.splitlines()) == 1
    assert main(["--submission", str(sp), "--ann", str(QVH / "highlight_val_release.jsonl"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_hint_names_the_flag(tmp_path):
    gt = [{"qid": q, "duration": 10, "relevant_windows": [[0, 2]]} for q in (1, 2)]
    sp, gp = _write(tmp_path / "s.jsonl", [{"qid": 1, "pred_relevant_windows": [[0, 2, 1.0]]}]), _write(tmp_path / "g.jsonl", gt)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "engine.evaluate", "--submission", str(sp), "--ann", str(gp)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "(use --no-match-number to evaluate the intersection)" in r.stderr
    assert "match_number=False" not in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match=r"use match_number=False"):  # the Python API names the argument
        evaluate_qvhighlights([{"qid": 1, "pred_relevant_windows": [[0, 2, 1.0]]}], gt)


def test_cli_non_utf8_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"qid": 1, "query": "caf\xe9"}\n'.encode("latin-1"))
    assert main(["--submission", str(bad), "--ann", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:1: not UTF-8 text") and len(err.splitlines()) == 1
