"""``--cuda-graph``: the training step captured once per batch shape and replayed (issue 15, item 4).

:class:`engine.step.TrainStep` has no host sync and no host<->device copy, so its kernels can be recorded
as one CUDA graph. Shapes must repeat for the graphs to be reused: batches are padded to fixed buckets
(:func:`length_buckets`: the capped length for a capped preset, steps of ``step`` clips up to the split's
longest video for an uncapped one; the text to ``max_q_l``), and the model trains with
``bn_stats="valid"`` so that the extra padding changes nothing (``reference.conv_blocks``).

Per new shape: the model/optimizer state and the RNG are saved, three eager warm-up steps run on a side
stream (they allocate the optimizer-free buffers and caches a capture cannot create), the state is
restored in place, and the step is captured; every step, the batch is copied into the graph's static
input tensors (device to device) and the graph is replayed. Capture needs a CUDA device: on CPU this
module is only imported (tests/test_cuda_graph.py skips with the reason).
"""

from __future__ import annotations

import bisect
from typing import Any, Callable

import torch
from torch import Tensor

from .step import TrainStep


def length_buckets(longest: int, cap: int | None, step: int = 32) -> list[int]:
    """Bucket lengths for videos of up to ``longest`` clips: ``[cap]`` when capped, else multiples of
    ``step`` up to the first one >= ``longest``."""
    if cap is not None:
        return [min(cap, max(1, longest))]
    return list(range(step, longest + step, step)) or [step]


def bucket_of(n: int, buckets: list[int]) -> int:
    """The smallest bucket >= n (ValueError naming n and the largest bucket when none is)."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"length {n} is longer than the largest bucket {buckets[-1]}")
    return buckets[i]


def pad_batch(batch: dict[str, Any], video_len: int, text_len: int) -> dict[str, Any]:
    """Zero-pad a collated batch's video (and masks, saliency labels) to ``video_len`` clips and its text to
    ``text_len`` tokens (masks False there, so the model and the losses ignore the padding)."""
    def pad(t: Tensor, n: int, value=0) -> Tensor:
        extra = n - t.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad length {t.shape[1]} down to the bucket {n}")
        if extra == 0:
            return t
        return torch.cat([t, t.new_full((t.shape[0], extra) + tuple(t.shape[2:]), value)], dim=1)

    out = dict(batch)
    out["video"], out["video_mask"] = pad(batch["video"], video_len), pad(batch["video_mask"], video_len, False)
    out["text"], out["text_mask"] = pad(batch["text"], text_len), pad(batch["text_mask"], text_len, False)
    if "targets" in batch:
        targets = dict(batch["targets"])
        targets["saliency_all_labels"] = pad(targets["saliency_all_labels"], video_len)
        out["targets"] = targets
    return out


class CudaGraphStep:
    """A :class:`TrainStep` replayed from one CUDA graph per input shape (see module doc).

    ``state_tensors`` (e.g. ``lambda: [*model.state_dict().values(), *optimizer_state_tensors]``) lists every
    tensor a step mutates, so the warm-up steps can be undone in place.
    """

    def __init__(self, step: TrainStep, state_tensors: Callable[[], list[Tensor]], warmup: int = 3):
        if step.device.type != "cuda":
            raise ValueError(f"--cuda-graph needs a CUDA device, got {step.device}")
        self.step, self.state_tensors, self.warmup = step, state_tensors, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def set_alpha(self, alpha: float) -> None:
        self.step.set_alpha(alpha)  # alpha is a static device tensor the graph reads

    @staticmethod
    def _key(batch: dict) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in _flat(batch))

    def __call__(self, batch: dict) -> dict[str, Tensor]:
        key = self._key(batch)
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch)
        graph, static_in, static_out = self.graphs[key]
        for (_, dst), (_, src) in zip(_flat(static_in), _flat(batch)):
            dst.copy_(src, non_blocking=True)  # device to device
        graph.replay()
        return static_out

    def _capture(self, batch: dict):
        static_in = _clone(batch)
        saved = [t.detach().clone() for t in self.state_tensors()]
        rng = torch.cuda.get_rng_state(), torch.get_rng_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(static_in)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # undo the warm-up: the captured step starts from the state it was called with
            for t, s in zip(self.state_tensors(), saved):
                t.copy_(s)
        torch.cuda.set_rng_state(rng[0])
        torch.set_rng_state(rng[1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.step(static_in)
        return graph, static_in, static_out


def _flat(batch: dict, prefix: str = "") -> list[tuple[str, Tensor]]:
    out = []
    for k in sorted(batch):
        v = batch[k]
        if isinstance(v, dict):
            out += _flat(v, prefix + k + ".")
        elif torch.is_tensor(v):
            out.append((prefix + k, v))
    return out


def _clone(batch: dict) -> dict:
    return {k: (_clone(v) if isinstance(v, dict) else v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}


__all__ = ["CudaGraphStep", "length_buckets", "bucket_of", "pad_batch"]
