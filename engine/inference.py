"""The inference engine: the fused LD-DETR (:mod:`engine.fused`) built FROM a reference model's weights.

    import engine
    eng = engine.build("runs/synthetic/best.pt", device="cuda", dtype="bf16")
    out = eng(video, video_mask, text, text_mask)   # pred_logits, pred_spans, saliency_scores, video_mask

``build`` makes a :class:`engine.fused.FusedLDDETR` from a reference ``LDDETR`` (the reference is never
modified; it stays the source of truth) and wraps it:

* the fused model computes the same function with less work — packed/hoisted Loop Decoder, BN folded once,
  GEMM conv blocks (the Triton kernel on CUDA), precomputed sine tables, the GRU as one custom op, dead
  outputs dropped (see :mod:`engine.fused`); training-only state (momentum encoders, Distill-Align queues,
  aux outputs) is not carried over;
* ``dtype`` "fp32" | "bf16" | "fp16" (or the torch dtype): native half precision — weights and activations
  stored in it, LayerNorm/softmax/GRU gates accumulating in fp32, no autocast;
* optional static-shape buckets: a video shorter than a bucket is padded to it and masked, which leaves
  the outputs unchanged (the model is padding-invariant, tested) and gives ``torch.compile``/CUDA graphs
  one shape per bucket. Default: the preset's max video length on CUDA, none on CPU (padding only adds
  work there); text buckets the same way (default on CUDA: multiples of 8 up to ``max_q_l``);
* optional ``compile``: True / "model" compiles the whole fused forward (``fullgraph=True``), "decoder"
  only the fused Loop Decoder;
* optional CUDA graphs (``cuda_graphs``; default on CUDA for batches up to 256): the forward (eager or
  compiled) is captured once per input shape — (video batch, text batch, video bucket, text bucket) — into
  a manual ``torch.cuda.CUDAGraph`` sharing one memory pool, then replayed: inputs are copied into static
  buffers, outputs are copied out (a caller never sees a buffer the next replay overwrites). Inputs are
  validated before any capture, so a bad input raises and leaves graphs on; only a failing capture makes
  the engine warn once and run without graphs.

What became of the options of the reference-schedule engine: ``kernels_backend`` is now ``backend`` (the old
name still works, with a DeprecationWarning); ``kernels_precision`` is ``precision``; ``precast_weights`` is
gone (half-precision weights are always stored once, natively) and is accepted with a DeprecationWarning;
``compile="decoder"`` compiles the fused Loop Decoder.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels._utils import BACKENDS, PRECISIONS
from kernels.onednn import FAST_KERNEL_ISA, has_fast_kernels
from reference import LDDETR
from reference.validate import check_input_shapes

from .checkpoint import load_checkpoint
from .cli import DTYPES, to_dtype
from .fused import FusedLDDETR

HALF = (torch.bfloat16, torch.float16)
# default largest batch captured in a CUDA graph: even B=256 is launch-bound in eager (H200, run4: bf16
# 27.7 ms eager vs 11.2 ms replayed), so graphs pay at every batch size measured
GRAPH_MAX_BATCH = 256
GRAPH_MAX_SHAPES = 64  # captured shapes kept before the oldest is dropped (each holds its static buffers)
COMPILE_MODES = (None, False, True, "model", "decoder")


class _CapturedForward:
    """One CUDA graph of ``fn`` at fixed input shapes: warm-up on a side stream, capture, replay.

    ``fn(*inputs) -> dict of tensors``. Replay copies the inputs into the static buffers and returns
    copies of the static outputs."""

    def __init__(self, fn: Callable[..., dict], example: tuple[Tensor, ...], pool, warmup: int = 2):
        self.inputs = tuple(x.clone() for x in example)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: cuDNN/cuBLAS handles, Triton autotune, lazy inits
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> dict:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return {k: v.clone() for k, v in self.outputs.items()}


class Engine(nn.Module):
    """Inference-only wrapper around a :class:`FusedLDDETR` (see module docstring)."""

    def __init__(self, model: FusedLDDETR, *, dtype: torch.dtype = torch.float32, buckets: tuple[int, ...] = (),
                 text_buckets: tuple[int, ...] = (), run: nn.Module | None = None, graph_max_batch: int = 0):
        super().__init__()
        self.model = model
        self.run = run if run is not None else model  # the callable forward (a compiled wrapper or the model)
        self.cfg = model.cfg
        self.dtype = dtype
        self.buckets = tuple(sorted(buckets))
        self.text_buckets = tuple(sorted(text_buckets))
        self.graph_max_batch = graph_max_batch  # 0: no CUDA graphs
        self._graphs: dict[tuple, _CapturedForward] = {}
        self._graph_pool = None
        super().train(False)

    def train(self, mode: bool = True) -> "Engine":
        if mode:
            raise RuntimeError("the engine is inference-only; train the reference model (python -m engine.train)")
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.buffers()).device

    def bucket_length(self, t: int) -> int:
        """The padded video length for a batch of length t: the smallest bucket >= t, else t."""
        return next((b for b in self.buckets if b >= t), t)

    def text_bucket_length(self, n: int) -> int:
        """The padded text length for a batch of n tokens: the smallest text bucket >= n, else n."""
        return next((b for b in self.text_buckets if b >= n), n)

    @property
    def num_graphs(self) -> int:
        """CUDA graphs captured so far (one per input shape)."""
        return len(self._graphs)

    def _forward(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor) -> dict:
        if self.run is self.model:
            out = self.model(video, video_mask, text, text_mask)
        else:  # compiled: nn.GRU (when the GRU op is unavailable) needs dynamo's allow_rnn, patched per call
            with torch._dynamo.config.patch(allow_rnn=True):
                out = self.run(video, video_mask, text, text_mask)
        return {k: out[k] for k in ("pred_logits", "pred_spans", "saliency_scores", "video_mask")}

    def _graphed(self, inputs: tuple[Tensor, ...]) -> dict | None:
        """Replay (capturing on first sight) the CUDA graph for these input shapes; None = run eagerly.

        Only the capture is guarded: the inputs were validated before (``forward``), so an exception here
        is a capture failure, and the engine falls back to eager for good (saying why, once)."""
        key = tuple(tuple(x.shape) for x in inputs) + (tuple(x.dtype for x in inputs),)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= GRAPH_MAX_SHAPES:
                self._graphs.pop(next(iter(self._graphs)))
            try:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                graph = self._graphs[key] = _CapturedForward(self._forward, inputs, self._graph_pool)
            except Exception as e:  # noqa: BLE001 - capture is an optimisation: fall back, say why once
                warnings.warn(f"CUDA-graph capture failed ({type(e).__name__}: {e}); the engine runs without "
                              f"CUDA graphs", RuntimeWarning, stacklevel=3)
                self.graph_max_batch = 0
                self._graphs.clear()
                return None
        return graph(*inputs)

    def _check(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor) -> None:
        cfg = self.cfg
        check_input_shapes(video, video_mask, text, text_mask, v_feat_dim=cfg.v_feat_dim, t_feat_dim=cfg.t_feat_dim,
                           max_v_l=cfg.max_video_len, max_q_l=cfg.max_q_l if cfg.use_txt_pos else None)

    @torch.inference_mode()
    def forward(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor) -> dict:
        """video (B or 1, T, Dv), video_mask (B or 1, T), text (B, N, Dt), text_mask (B, N) ->
        pred_logits (B, Q, 2), pred_spans (B, Q, 2), saliency_scores (B, T), video_mask (B, T) bool."""
        self._check(video, video_mask, text, text_mask)  # bad input raises here, before any capture
        t, n = video.shape[1], text.shape[1]
        length, text_length = self.bucket_length(t), self.text_bucket_length(n)
        video_mask, text_mask = video_mask.bool(), text_mask.bool()
        if length > t:  # pad clips (zeros, masked out) up to the bucket
            video = F.pad(video, (0, 0, 0, length - t))
            video_mask = F.pad(video_mask, (0, length - t), value=False)
        if text_length > n:  # pad tokens the same way
            text = F.pad(text, (0, 0, 0, text_length - n))
            text_mask = F.pad(text_mask, (0, text_length - n), value=False)
        if video.dtype != self.dtype:
            video = video.to(self.dtype)
        if text.dtype != self.dtype:
            text = text.to(self.dtype)
        inputs = (video, video_mask, text, text_mask)
        out = None
        if self._use_graphs(inputs):
            out = self._graphed(inputs)
        if out is None:
            out = self._forward(*inputs)
        return {"pred_logits": out["pred_logits"], "pred_spans": out["pred_spans"],
                "saliency_scores": out["saliency_scores"][:, :t], "video_mask": out["video_mask"][:, :t]}

    def _use_graphs(self, inputs: tuple[Tensor, ...]) -> bool:
        return (0 < inputs[2].shape[0] <= self.graph_max_batch and inputs[0].is_cuda
                and not torch.cuda.is_current_stream_capturing())


def set_backend(model: FusedLDDETR, backend: str = "auto", precision: str = "auto") -> FusedLDDETR:
    """Choose the kernels the fused modules launch: ``backend`` "auto" (Triton on CUDA, torch elsewhere) |
    "triton" | "torch"; ``precision`` the fp32 dot mode of the Triton kernels ("auto" | "ieee" | "tf32" |
    "tf32x3")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for m in model.modules():
        if hasattr(type(m), "kernel_backend"):
            m.kernel_backend = backend
        if hasattr(type(m), "kernel_precision"):
            m.kernel_precision = precision
    return model


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"build({old}=...) is deprecated: {new}", DeprecationWarning, stacklevel=3)


def compile_options(device: torch.device, backend: str, mode: str | None) -> dict:
    """``torch.compile`` keyword arguments for the whole fused forward. On the CPU, inductor with
    ``freezing``: the weights become constants, so linears run as prepacked GEMMs with their epilogues
    fused (2 CPU threads, B=1 fp32: 2.40x the reference against 1.63x eager on a Xeon with AMX,
    bench/results/cpu-2t_20261203_d94caeb.json; on an AMD EPYC no faster than eager, 1.55x vs 1.63x, since
    inductor keeps MKL for fp32 GEMMs there, bench/results/cpu-2t_20261204_aeb0471.json) — a mode
    given by the caller wins (torch.compile takes a mode or options, not both)."""
    if mode is None and backend == "inductor" and device.type == "cpu":
        return {"options": {"freezing": True}}
    return {"mode": mode}


def build(model_or_checkpoint: LDDETR | str | os.PathLike, *, device: str | torch.device | None = None,
          dtype: str | torch.dtype = "fp32", backend: str = "auto", precision: str = "auto",
          buckets: Iterable[int] | str | None = "auto", text_buckets: Iterable[int] | str | None = "auto",
          compile: bool | str | None = None, compile_backend: str = "inductor", compile_mode: str | None = None,
          cuda_graphs: bool | str = "auto", graph_max_batch: int = GRAPH_MAX_BATCH, **deprecated) -> Engine:
    """An inference :class:`Engine` around the fused model built from a reference model's weights (the
    reference is not modified) or from a checkpoint written by ``engine.train``.

    ``dtype``: "fp32" | "bf16" | "fp16" (or the torch dtype), native. ``backend`` / ``precision``: see
    :func:`set_backend`. ``buckets``: "auto" (the preset's max video length on CUDA, none on CPU), None / ()
    for none, or lengths to pad to; ``text_buckets`` likewise for the query length ("auto" on CUDA:
    multiples of 8 up to ``max_q_l``). ``compile``: None/False, True or "model" (the whole forward) or
    "decoder" (the fused Loop Decoder), with ``fullgraph=True``; ``compile_mode`` is passed to
    ``torch.compile``. ``cuda_graphs``: "auto" (on CUDA), True or False — capture and replay one CUDA graph
    per input shape for batches up to ``graph_max_batch``. Old names: ``kernels_backend`` (= ``backend``),
    ``kernels_precision`` (= ``precision``), ``precast_weights`` (no effect: half weights are native).
    """
    for old, value in deprecated.items():
        if old == "kernels_backend":
            _deprecated(old, "use backend=")
            backend = value
        elif old == "kernels_precision":
            _deprecated(old, "use precision=")
            precision = value
        elif old == "precast_weights":
            _deprecated(old, "half-precision weights are always stored natively; the option has no effect")
        else:
            raise TypeError(f"build() got an unexpected keyword argument {old!r}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be None, True, 'model' or 'decoder', got {compile!r}")
    dtype = to_dtype(dtype)
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        model, _ = load_checkpoint(model_or_checkpoint)
    elif isinstance(model_or_checkpoint, LDDETR):
        model = model_or_checkpoint
    else:
        raise TypeError(f"build expects an LDDETR or a checkpoint path, got {type(model_or_checkpoint).__name__}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fused = FusedLDDETR.from_reference(model).to(device)
    if dtype != torch.float32:
        fused.to_dtype(dtype)
        if device.type == "cpu" and not has_fast_kernels(dtype):
            name = next(k for k, v in DTYPES.items() if v == dtype)
            warnings.warn(f"dtype={name} on this CPU: it has no fast {name} kernels (oneDNN needs "
                          f"{FAST_KERNEL_ISA[dtype]}), so the {name} engine runs several times slower than fp32 "
                          "here; use dtype='fp32'", stacklevel=2)
    set_backend(fused, backend, precision)
    cfg = model.cfg
    if buckets == "auto":
        buckets = (cfg.max_video_len,) if device.type == "cuda" and cfg.max_video_len else ()
    buckets = tuple(int(b) for b in (buckets or ()))
    if cfg.max_video_len and any(b > cfg.max_video_len for b in buckets):
        raise ValueError(f"buckets {buckets} exceed the model's max video length {cfg.max_video_len}")
    if text_buckets == "auto":
        max_q = cfg.max_q_l
        text_buckets = tuple(sorted({*range(8, max_q, 8), max_q})) if device.type == "cuda" and max_q else ()
    text_buckets = tuple(int(b) for b in (text_buckets or ()))
    if cuda_graphs not in ("auto", True, False):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    if cuda_graphs is True and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}")
    graphs = device.type == "cuda" and cuda_graphs in ("auto", True)
    run = None
    dynamic = not buckets
    if compile == "decoder":
        fused.decoder = torch.compile(fused.decoder, fullgraph=True, dynamic=dynamic, backend=compile_backend,
                                      mode=compile_mode)
    elif compile in (True, "model"):
        run = torch.compile(fused, fullgraph=True, dynamic=dynamic, backend=compile_backend,
                            **compile_options(device, compile_backend, compile_mode))
    return Engine(fused, dtype=dtype, buckets=buckets, text_buckets=text_buckets, run=run,
                  graph_max_batch=graph_max_batch if graphs else 0)
