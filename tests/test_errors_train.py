"""engine.train never loses work and never prints a traceback for an input problem: bad flags and bad data are
refused before the first step (one line, exit 2), an evaluation error comes after the epoch's latest.pt,
Ctrl-C says how to resume, a killed checkpoint write's .tmp is removed, a worker's error is unwrapped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import engine.train as train_mod
from engine.train import main

TINY = ["--set", "queue_length=16", "--batch-size", "4", "--num-workers", "0", "--quiet", "--dataset", "synthetic",
        "--max-steps-per-epoch", "1"]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1] if err else ""


def _patch_step(monkeypatch, fn) -> None:
    """Replace the training step, both forms: the one-graph ``engine.step.TrainStep`` and the fp16 loop."""
    monkeypatch.setattr(train_mod, "train_step", fn)
    monkeypatch.setattr(train_mod.TrainStep, "__call__", fn)


@pytest.mark.parametrize("flags, text", [
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--eval-every", "0"], "--eval-every: must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["--lr", "nan"], "--lr: must be a finite number > 0, got 'nan'"),
    (["--dtype", "fp8"], "--dtype: invalid choice 'fp8'"),
    (["--compile", "--compile-backend", "nope"], "--compile-backend: 'nope' is not a torch.compile backend"),
])

def test_bad_flags_exit_2_with_one_line(flags, text, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and text in err and len(err.splitlines()) == 1 and '--amp' not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tiny_synthetic, tmp_path, capsys):
    assert main(["--data-root", str(tiny_synthetic), "--out", str(tmp_path / "o"), "--device", "cuda", *TINY]) == 2
    assert _err(capsys) == "error: --device cuda: CUDA is not available here (torch sees no GPU); use --device cpu"


def test_unwritable_out_is_refused_before_any_work(tiny_synthetic, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--data-root", str(tiny_synthetic), "--out", str(tmp_path / "file" / "run"), *TINY]) == 2
    assert _err(capsys).startswith(f"error: --out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file")


def _copy(src: Path, dst: Path, val_records=None) -> Path:
    shutil.copytree(src, dst)
    if val_records is not None:
        (dst / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val_records))
    return dst


@pytest.mark.parametrize("bad, text", [
    ("reversed", "windows empty, reversed or outside the duration: "),
    ("clip_ids", "relevant_clip_ids outside the video's clips: "),
    ("long", "videos longer than max_v_l"),
    ("empty", "annotation files without any record: "),
])
def test_bad_val_data_is_refused_before_the_first_step(bad, text, tiny_synthetic, tmp_path, capsys, monkeypatch):
    val = [json.loads(line) for line in (tiny_synthetic / "val.jsonl").read_text().splitlines()]
    rec = dict(val[1])
    if bad == "reversed":
        rec["relevant_windows"] = [[10, 4]]
    elif bad == "clip_ids":
        rec["relevant_clip_ids"] = [0, 400]
        rec["saliency_scores"] = [[1, 1, 1], [2, 2, 2]]
    elif bad == "long":
        rec["duration"] = 1000
    records = [] if bad == "empty" else [val[0], rec] + val[2:]
    root = _copy(tiny_synthetic, tmp_path / "data", records)
    steps = []
    _patch_step(monkeypatch, lambda *a, **k: steps.append(1))
    assert main(["--data-root", str(root), "--out", str(tmp_path / "o"), *TINY]) == 2
    err = _err(capsys)
    assert err.startswith("error: val data: ") and text in err and "python -m engine.data check" in err
    assert steps == []  # refused before any training step


def test_evaluation_error_comes_after_latest_pt(tiny_synthetic, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise ValueError("qid 3: pred_relevant_windows[0] = [nan, nan, 0.5] is malformed")

    monkeypatch.setattr(train_mod, "evaluate", broken)
    out = tmp_path / "o"
    assert main(["--data-root", str(tiny_synthetic), "--out", str(out), "--epochs", "1", *TINY]) == 2
    err = _err(capsys)
    assert err.startswith("error: evaluation after epoch 1 failed: qid 3: pred_relevant_windows[0]")
    assert f"--resume {out / 'latest.pt'}" in err
    assert (out / "latest.pt").is_file() and not (out / "best.pt").exists()


def test_ctrl_c_says_how_to_resume_and_stale_tmp_is_removed(tiny_synthetic, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    stale = out / ".latest.pt.abc123.tmp"  # what kill -9 during atomic_torch_save leaves
    stale.write_bytes(b"\0" * 1024)
    (out / "latest.pt").write_bytes(b"from an earlier epoch")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    _patch_step(monkeypatch, interrupt)
    assert main(["--data-root", str(tiny_synthetic), "--out", str(out), *TINY]) == 130
    err = capsys.readouterr().err
    assert "removed .latest.pt.abc123.tmp" in err and not stale.exists()
    assert err.strip().splitlines()[-1] == f"interrupted: continue with the same command plus --resume {out / 'latest.pt'}"
    (out / "latest.pt").unlink()
    assert main(["--data-root", str(tiny_synthetic), "--out", str(out), *TINY]) == 130
    assert capsys.readouterr().err.strip().endswith("no epoch finished, so there is nothing to resume")


def test_disk_full_is_one_line(tiny_synthetic, tmp_path, capsys, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "latest.pt"))

    monkeypatch.setattr(train_mod, "save_checkpoint", full)
    assert main(["--data-root", str(tiny_synthetic), "--out", str(tmp_path / "o"), "--epochs", "1", *TINY]) == 2
    assert _err(capsys) == f"error: no space left on the device writing {tmp_path / 'o' / 'latest.pt'}"


def test_dataloader_worker_error_is_unwrapped(tiny_synthetic, tmp_path, capsys, monkeypatch):
    from engine.data import DataError
    from torch.utils.data._utils import ExceptionWrapper

    def worker_failure(*a, **k):
        try:
            raise DataError("/data/clip_features/v1.npz: video features has NaN/inf values in 3 of 8 rows")
        except DataError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    _patch_step(monkeypatch, worker_failure)
    assert main(["--data-root", str(tiny_synthetic), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert _err(capsys) == ("error: in a DataLoader worker: DataError: /data/clip_features/v1.npz: video features "
                            "has NaN/inf values in 3 of 8 rows")


def test_old_amp_spelling_still_works():
    args = train_mod.build_parser().parse_args(["--amp", "off"])
    assert args.dtype == "fp32" and train_mod._amp(args) == "off"
    assert train_mod._amp(train_mod.build_parser().parse_args(["--dtype", "bf16"])) == "bf16"


def test_early_stop_on_the_selection_metric(tiny_synthetic, tmp_path, capsys, monkeypatch):
    """--early-stop N (the preset's max_es_cnt, which nothing read before): N evaluations without a better
    MR-full-mAP end the run."""
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: {"brief": {"MR-full-mAP": 10.0}})
    out = tmp_path / "o"
    assert main(["--data-root", str(tiny_synthetic), "--out", str(out), "--epochs", "5", "--early-stop", "1",
                 *TINY]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 2 did not improve on epoch 1: stop
    assert "early stop: no better MR-full-mAP in the last 1 evaluation(s)" in (out / "train.log").read_text()
    assert json.loads((out / "config.json").read_text())["max_es_cnt"] == 1
