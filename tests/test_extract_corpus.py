"""Corpus extraction: a list file, sharded over 2 torchrun ranks (gloo, CPU), == one process, resumable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extract_helpers import write_video

from engine.extract.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(d: Path) -> Path:
    sizes = [(20, 10, 32, 24), (35, 15, 40, 30), (30, 5, 24, 36), (44, 20, 32, 32), (16, 8, 36, 20)]
    for i, (n, fps, w, h) in enumerate(sizes):
        write_video(d / f"v{i}.mp4", n, fps, w, h, audio=i == 1)
    lst = d / "videos.txt"
    lst.write_text("# a list file: relative paths are relative to it\n" + "".join(f"v{i}.mp4\n" for i in range(5)))
    return lst


def _files(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.load(p)[np.load(p).files[0]] for p in sorted(root.rglob("*.npz"))}


def test_torchrun_two_gloo_ranks(tmp_path, tiny_clip_dir, capsys):
    lst = _corpus(tmp_path)
    common = ["--videos", str(lst), "--clip", str(tiny_clip_dir), "--slowfast-test-config", "tiny", "--device", "cpu",
              "--quiet"]
    single = tmp_path / "single"
    assert main(common + ["--out", str(single)]) == 0
    sharded = tmp_path / "sharded"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "engine.extract"] + common + ["--out", str(sharded)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 0/2: extracted 3, skipped 0 of its 3 videos" in r.stderr
    assert "rank 1/2: extracted 2, skipped 0 of its 2 videos" in r.stderr
    a, b = _files(single), _files(sharded)
    assert sorted(a) == sorted(b) and len(a) == 10
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert (sharded / "manifest.json").is_file()
    capsys.readouterr()
    assert main(common + ["--out", str(sharded)]) == 0  # rerun (one process): everything is skipped
    assert '"extracted": 0, "skipped": 5' in capsys.readouterr().err
    assert not list(sharded.rglob("*.tmp"))


def test_skip_bad_goes_on(tmp_path, tiny_clip_dir, capsys):
    write_video(tmp_path / "good.mp4", 20, 10, 32, 24)
    (tmp_path / "broken.mp4").write_bytes(b"junk" * 50)
    rc = main(["--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--clip", str(tiny_clip_dir), "--features",
               "clip", "--device", "cpu", "--skip-bad"])
    err = capsys.readouterr().err
    assert rc == 0 and "skipping: video" in err
    assert f"wrote features of 2 videos to {tmp_path / 'o'} (manifest.json)" in err, "a note without --quiet"
    assert [p.name for p in (tmp_path / "o" / "clip_features").iterdir()] == ["good.npz"]
