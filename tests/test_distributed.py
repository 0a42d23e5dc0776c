"""torchrun with 2 CPU processes (gloo): DDP trains and keeps one global Distill Align queue."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_keeps_a_global_queue(tiny_synthetic, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "engine.train", "--data-root", str(tiny_synthetic),
           "--dataset", "synthetic", "--out", str(out), "--epochs", "1", "--batch-size", "4",
           "--set", "queue_length=64", "--device", "cpu", "--quiet", "--debug-dump-queue"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    # 16 train samples, 2 ranks x batch 4 -> 2 steps per rank; every step enqueues 2 x 4 gathered features
    assert int(ckpt["model"]["distill_align.queue_ptr"]) == 16
    queues = [torch.load(out / f"queue_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(queues[0], queues[1])  # one global queue, identical on both ranks
    assert json.loads((out / "metrics.json").read_text())["history"][0]["epoch"] == 1
