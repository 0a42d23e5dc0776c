"""Minimal DistributedDataParallel plumbing for ``torchrun --nproc_per_node=N -m engine.train ...``.

One process per device; the backend is NCCL on CUDA and gloo on CPU. The Distill Align queue stays
global: each rank all-gathers the momentum features of the step before enqueueing (as MoCo/ALBEF do), so
every rank writes the same columns and the queues stay identical without broadcasting them.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Initialise the process group when launched by torchrun; returns True when distributed."""
    if env_world_size() <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """(B, d) per rank -> (W*B, d), rank order; no gradient (used for the queue only)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
