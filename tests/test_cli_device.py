"""``--device`` checked up front, through ``engine.cli.resolve_device``: on the commands that run no model
(``engine.evaluate``, ``engine.data check|synth``, ``engine.extract.slowfast_convert``) the work stays on the CPU
with numpy and the name is only checked, before any file is read or written; ``engine.extract`` (which runs CLIP /
SlowFast) checks it before any video is listed or opened, any model built or process group started. So
``--device cuda`` without CUDA is the same one-line error, exit 2, as in ``engine.train`` / ``engine.predict``.
(Which command says what in ``--help``: tests/test_cli_vocabulary.py.)"""

from __future__ import annotations

import json

import pytest
import torch

import engine.data
import engine.evaluate
import engine.extract.__main__ as extract_main
import engine.extract.slowfast_convert as slowfast_convert
import engine.synthetic
from engine import cli
from engine.data import main as data_main
from engine.evaluate import main as evaluate_main

NO_CUDA = "error: --device cuda: CUDA is not available here (torch sees no GPU); use --device cpu"


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, also where the tests run on a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def no_work(monkeypatch):
    """Every entry into the work fails the test: the device is checked before any of it."""
    def boom(*a, **k):
        raise AssertionError("work started before --device was checked")
    monkeypatch.setattr(engine.evaluate, "load_jsonl", boom)
    monkeypatch.setattr(engine.data, "check_dataset", boom)
    monkeypatch.setattr(engine.data, "feature_spec_for", boom)
    monkeypatch.setattr(engine.synthetic, "make_synthetic_dataset", boom)
    monkeypatch.setattr(engine.synthetic, "ensure_synthetic_dataset", boom)
    for name in ("list_videos", "extract_corpus", "write_manifest"):
        monkeypatch.setattr(extract_main, name, boom)
    monkeypatch.setattr(extract_main.Extractors, "build", boom)
    monkeypatch.setattr(extract_main.dist, "init_from_env", boom)
    monkeypatch.setattr(slowfast_convert, "read_c2_pickle", boom)


def _evaluate_args(tmp_path):
    ann = tmp_path / "gt.jsonl"
    ann.write_text(json.dumps({"qid": 1, "query": "q", "vid": "v", "duration": 20, "relevant_windows": [[2, 8]],
                               "relevant_clip_ids": [1, 2, 3], "saliency_scores": [[1, 2, 3]] * 3}) + "\n")
    sub = tmp_path / "sub.jsonl"
    sub.write_text(json.dumps({"qid": 1, "pred_relevant_windows": [[2, 8, 0.9], [0, 4, 0.5]]}) + "\n")
    return ["--submission", str(sub), "--ann", str(ann)]


COMMANDS = {
    "engine.evaluate": (evaluate_main, _evaluate_args),
    "engine.data check": (data_main, lambda tmp: ["check", "--dataset", "synthetic", "--data-root", str(tmp / "syn")]),
    "engine.data synth": (data_main, lambda tmp: ["synth", "--out", str(tmp / "syn"), "--n-train", "4", "--n-val",
                                                  "3", "--quiet"]),
    "engine.extract": (extract_main.main, lambda tmp: ["--videos", str(tmp / "videos"), "--out", str(tmp / "syn"),
                                                      "--queries", str(tmp / "q.jsonl"), "--quiet"]),
    "engine.extract.slowfast_convert": (slowfast_convert.main, lambda tmp: [str(tmp / "w.pkl"), "--out",
                                                                            str(tmp / "syn" / "w.safetensors")]),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_device_cuda_without_cuda_is_one_line_exit_2(command, tmp_path, capsys, no_cuda, no_work):
    main, args = COMMANDS[command]
    assert main([*args(tmp_path), "--device", "cuda"]) == cli.EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert err.strip() == NO_CUDA and out == ""
    assert not (tmp_path / "syn").exists(), "nothing written"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_malformed_device_is_one_line_exit_2(command, tmp_path, capsys, no_work):
    main, args = COMMANDS[command]
    assert main([*args(tmp_path), "--device", "gpu0"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--device 'gpu0' is not a device name" in err


def test_the_same_line_as_train_and_predict(no_cuda):
    with pytest.raises(ValueError) as e:
        cli.resolve_device("cuda")
    assert f"error: {e.value}" == NO_CUDA


def test_device_cpu_runs_as_without_it(tmp_path, capsys, no_cuda):
    outputs = []
    for device in ([], ["--device", "cpu"]):
        assert data_main(["synth", "--out", str(tmp_path / "syn"), "--n-train", "4", "--n-val", "3", "--quiet",
                          *device]) == 0
        assert data_main(["check", "--dataset", "synthetic", "--data-root", str(tmp_path / "syn"), "--quiet",
                          *device]) == 0
        assert "clean" in capsys.readouterr().out
        assert evaluate_main([*_evaluate_args(tmp_path), *device]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and "MR-full-mAP" in outputs[0], "the same metrics with and without --device cpu"


def test_add_device_note_says_no_model_and_cpu():
    import argparse

    p = argparse.ArgumentParser()
    cli.add_device(p, note="the work is done with numpy")
    text = next(a for a in p._actions if a.dest == "device").help
    assert cli.RUNS_NO_MODEL in text and "the work is done with numpy on the CPU" in text and "default" not in text
    q = argparse.ArgumentParser()
    cli.add_device(q)
    assert cli.RUNS_NO_MODEL not in next(a for a in q._actions if a.dest == "device").help
