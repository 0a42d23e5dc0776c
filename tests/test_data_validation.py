"""One validator for the loader and ``engine.data check``: every data problem training rejects (or silently
mishandles) is reported by the check, the scan is cached, and a bad first file does not define the contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import engine.data_check as data_check
from engine.data import DataError, FeatureSpec, MomentDataset, check_dataset, feature_spec_for, first_problem, load_annotations
from engine.data import main as data_main

SF, CL, TX = 6, 4, 5
REC = {"qid": 7, "query": "a dog runs", "duration": 16, "vid": "v1", "relevant_clip_ids": [2, 3],
       "saliency_scores": [[1, 2, 1], [4, 4, 3]], "relevant_windows": [[4, 8]]}


def _npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _spec(**kw) -> FeatureSpec:
    return FeatureSpec(**{**dict(video_dims=[SF, CL], text_dim=TX, clip_length=2.0, max_v_l=75), **kw})


def _root(tmp_path: Path, n_clips: int = 8, tokens: int = 5, qid: int = 7, vid: str = "v1") -> Path:
    rng = np.random.default_rng(0)
    _npz(tmp_path / "slowfast_features" / f"{vid}.npz", features=rng.standard_normal((n_clips, SF)).astype(np.float32))
    _npz(tmp_path / "clip_features" / f"{vid}.npz", features=rng.standard_normal((n_clips, CL)).astype(np.float32))
    _npz(tmp_path / "clip_text_features" / f"qid{qid}.npz",
         last_hidden_state=rng.standard_normal((tokens, TX)).astype(np.float32))
    return tmp_path


def _ann(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _check(root: Path, records, **kw):
    return check_dataset("qvhighlights", root, [_ann(root / "a.jsonl", records)], _spec(), progress=False,
                         cache_dir=root / "cache", **kw)


@pytest.mark.parametrize("change, category, text", [
    (dict(relevant_windows=[[10, 4]]), "bad_window", "window [10, 4] has start > end"),
    (dict(relevant_windows=[[6, 6]]), "bad_window", "empty window [6, 6]"),
    (dict(relevant_windows=[]), "bad_annotation", "no relevant_windows"),
    (dict(relevant_clip_ids=[2, 8]), "bad_clip_ids", "relevant_clip_ids [8] outside [0, 8)"),
    (dict(relevant_clip_ids=[2, -1]), "bad_clip_ids", "relevant_clip_ids [-1] outside"),
    (dict(saliency_scores=None), "bad_annotation", "missing saliency labels"),
    (dict(duration=float("nan")), "bad_annotation", "duration must be a finite number > 0"),
    (dict(duration=400, relevant_windows=[[4, 8]]), "too_long", "longer than max_v_l=75 clips x 2 s = 150 s"),
])
def test_record_problems_are_found_by_check_and_loader(tmp_path, change, category, text):
    root = _root(tmp_path)
    rec = {**REC, **change}
    report = _check(root, [rec])
    assert not report["clean"] and report["problems"][category]["count"] == 1, report["problems"]
    assert text in first_problem(report)
    if category != "too_long":  # the loader truncates long videos; training refuses them through the check
        with pytest.raises(DataError, match=r"a\.jsonl: qid 7: "):
            MomentDataset(load_annotations(root / "a.jsonl"), root, _spec())


def test_clean_data_is_clean_and_unlabelled_split_passes(tmp_path):
    root = _root(tmp_path)
    assert _check(root, [REC])["clean"]
    test_split = {k: REC[k] for k in ("qid", "query", "duration", "vid")}
    assert _check(root, [test_split])["clean"]  # no labels anywhere in the file: a test split
    assert not _check(root, [test_split], labels=True)["clean"]  # training needs them


@pytest.mark.parametrize("what", ["nan_video", "inf_text", "zero_tokens"])
def test_feature_content_problems(tmp_path, what):
    root = _root(tmp_path, tokens=0 if what == "zero_tokens" else 5)
    if what == "nan_video":
        _npz(root / "clip_features" / "v1.npz", features=np.full((8, CL), np.nan, np.float32))
    if what == "inf_text":
        _npz(root / "clip_text_features" / "qid7.npz", last_hidden_state=np.full((5, TX), np.inf, np.float32))
    report = _check(root, [REC])
    category = "empty_features" if what == "zero_tokens" else "nonfinite"
    assert report["problems"][category]["count"] == 1, report["problems"]
    with pytest.raises(DataError):  # what the loader raises mid-epoch, the check reports up front
        MomentDataset([REC], root, _spec())[0]


def test_empty_annotation_file(tmp_path):
    root = _root(tmp_path)
    report = _check(root, [])
    assert report["problems"]["empty_file"]["count"] == 1 and "a.jsonl" in first_problem(report)


def test_scan_is_cached_and_changed_files_rescanned(tmp_path, monkeypatch):
    root = _root(tmp_path)
    reads = []
    real = data_check.read_array
    monkeypatch.setattr(data_check, "read_array", lambda p, k: reads.append(p) or real(p, k))
    assert _check(root, [REC])["clean"] and len(reads) == 3
    reads.clear()
    assert _check(root, [REC])["clean"] and reads == []  # nothing read again
    _npz(root / "clip_features" / "v1.npz", features=np.full((8, CL), np.nan, np.float32))
    report = _check(root, [REC])
    assert reads == [root / "clip_features" / "v1.npz"] and report["problems"]["nonfinite"]["count"] == 1


def test_bad_first_file_does_not_define_the_contract(tmp_path):
    for i in range(5):
        _root(tmp_path, qid=i, vid=f"v{i}")
    _npz(tmp_path / "clip_features" / "v0.npz", features=np.ones((8, CL + 3), np.float32))  # sorted first
    spec = feature_spec_for("qvhighlights", tmp_path)
    assert spec.video_dims == [SF, CL] and spec.text_dim == TX
    recs = [{**REC, "qid": i, "vid": f"v{i}"} for i in range(5)]
    report = check_dataset("qvhighlights", tmp_path, [_ann(tmp_path / "a.jsonl", recs)], spec, progress=False,
                           cache_dir=False)
    assert report["problems"]["dim_mismatch"]["count"] == 1  # only the bad file, not the 4 good ones
    assert report["problems"]["dim_mismatch"]["examples"][0]["file"].endswith("v0.npz")


def test_non_utf8_annotation_file_is_one_line(tmp_path, capsys):
    root = _root(tmp_path)
    (root / "bad.jsonl").write_bytes('{"qid": 1, "vid": "v1", "query": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"bad\.jsonl: not UTF-8 text"):
        load_annotations(root / "bad.jsonl")
    assert data_main(["check", "--dataset", "qvhighlights", "--data-root", str(root), "--ann", str(root / "bad.jsonl"),
                      "--quiet", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not UTF-8 text" in err and len(err.splitlines()) == 1


def test_check_cli_old_spellings_and_report_file(tmp_path, capsys):
    root = _root(tmp_path)
    _ann(root / "a.jsonl", [{**REC, "relevant_windows": [[10, 4]]}])
    out = root / "report" / "r.json"
    assert data_main(["check", "--dataset", "hl", "--root", str(root), "--max-v-l", "75", "--json", str(out),
                      "--quiet", "--no-cache"]) == 1
    assert "start > end" in capsys.readouterr().out
    assert json.loads(out.read_text())["problems"]["bad_window"]["count"] == 1


def test_contracts_from_older_versions_load_and_audio_is_gone():
    old = {**_spec().to_dict(), "audio_dir": None, "audio_dim": None}  # what earlier checkpoints stored
    assert FeatureSpec.from_dict(old) == _spec()
    with pytest.raises(ValueError, match=r"audio_dir='pann_features': audio features are not supported"):
        FeatureSpec.from_dict({**old, "audio_dir": "pann_features"})
    assert "audio_dir" not in _spec().to_dict()
