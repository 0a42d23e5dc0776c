"""The inference engine: an inference-only LD-DETR built FROM a reference model's weights.

    from engine.inference import build
    eng = build("runs/synthetic/best.pt", device="cuda", dtype=torch.bfloat16)
    out = eng(video, video_mask, text, text_mask)   # pred_logits, pred_spans, saliency_scores, video_mask

``build`` transforms a reference ``LDDETR``; it never restates the model math (the forward *is* the
reference forward in eval mode):

* a private deep copy in eval mode, with the training-only state dropped: the momentum encoders and the
  two 64 MiB Distill-Align queues (eval never reads them);
* the Convolutional Blocks run on BN-folded weights: the fused Triton kernel on CUDA
  (``kernels.apply``), folded torch convolutions elsewhere;
* ``dtype=torch.bfloat16`` / ``float16`` runs under autocast, so every op keeps the reference's own
  precision rules; the weights that autocast would cast on every use (the ``nn.Linear`` and attention
  projections: autocast does not cache casts of weights that need no grad, and the Loop Decoder reuses
  its weights ``decoder_loops`` times) are stored in that dtype once, which gives bit-identical outputs
  without the ~480 cast kernels per forward the profiler counted at B=1 (``bench/results`` run4);
* optional static-shape buckets: a video shorter than a bucket is padded to it and masked, which leaves
  the outputs unchanged because the reference is padding-invariant (tested), and gives
  ``torch.compile``/CUDA graphs one shape per bucket. Default: the preset's max video length on CUDA, none
  on CPU (padding would only add work there);
* text buckets the same way (default on CUDA: multiples of 8 up to ``max_q_l``), exact for the same reason;
* optional ``compile``: "decoder" puts the Loop Decoder under ``torch.compile(fullgraph=True)``; "model"
  the whole forward, also with ``fullgraph=True`` — zero graph breaks, because the highlight head's GRU is
  traced with ``torch._dynamo.config.allow_rnn`` (patched around each call, not set globally). Tested with
  dynamo's ``explain`` and parity;
* optional CUDA graphs (``cuda_graphs``; default on CUDA for batches up to 256): the forward (eager or
  compiled) is captured once per input shape — (video batch, text batch, video bucket, text bucket) — into
  a manual ``torch.cuda.CUDAGraph`` sharing one memory pool, then replayed: inputs are copied into static
  buffers, outputs are copied out (a caller never sees a buffer the next replay overwrites). The graph
  removes the per-kernel launch cost that dominates small batches. If a capture fails the engine warns
  once and runs without graphs.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from kernels.modules import TritonConvolutionalBlocks
from reference import LDDETR

from .checkpoint import load_checkpoint

HALF = (torch.bfloat16, torch.float16)
# default largest batch captured in a CUDA graph: even B=256 is launch-bound in eager (H200, run4: bf16
# 27.7 ms eager vs 11.2 ms replayed), so graphs pay at every batch size measured
GRAPH_MAX_BATCH = 256
GRAPH_MAX_SHAPES = 64  # captured shapes kept before the oldest is dropped (each holds its static buffers)


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
    """Inference-only wrapper around a transformed reference model (see module docstring)."""

    def __init__(self, model: LDDETR, *, dtype: torch.dtype = torch.float32, buckets: tuple[int, ...] = (),
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
        return next(self.model.parameters()).device

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

    def _forward(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor,
                 cache_casts: bool = True) -> dict:
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype in HALF,
                                  cache_enabled=cache_casts)
        if self.run is self.model:  # eager: no dynamo config to patch
            with autocast:
                out = self.model(video, video_mask, text, text_mask)
        else:
            with autocast, torch._dynamo.config.patch(allow_rnn=True):
                out = self.run(video, video_mask, text, text_mask)
        return {k: out[k] for k in ("pred_logits", "pred_spans", "saliency_scores", "video_mask")}

    def _graphed(self, inputs: tuple[Tensor, ...]) -> dict | None:
        """Replay (capturing on first sight) the CUDA graph for these input shapes; None = run eagerly."""
        key = tuple(tuple(x.shape) for x in inputs) + (tuple(x.dtype for x in inputs),)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= GRAPH_MAX_SHAPES:
                self._graphs.pop(next(iter(self._graphs)))
            try:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                # autocast's weight-cast cache must not outlive the capture (torch.cuda.graphs docs)
                fn = lambda *x: self._forward(*x, cache_casts=False)  # noqa: E731
                graph = self._graphs[key] = _CapturedForward(fn, inputs, self._graph_pool)
            except Exception as e:  # noqa: BLE001 - capture is an optimisation: fall back, say why once
                warnings.warn(f"CUDA-graph capture failed ({type(e).__name__}: {e}); the engine runs without "
                              f"CUDA graphs", RuntimeWarning, stacklevel=3)
                self.graph_max_batch = 0
                self._graphs.clear()
                return None
        return graph(*inputs)

    @torch.inference_mode()
    def forward(self, video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor) -> dict:
        """video (B or 1, T, Dv), video_mask (B or 1, T), text (B, N, Dt), text_mask (B, N) ->
        pred_logits (B, Q, 2), pred_spans (B, Q, 2), saliency_scores (B, T), video_mask (B, T) bool."""
        t, n = video.shape[1], text.shape[1]
        length, text_length = self.bucket_length(t), self.text_bucket_length(n)
        video_mask, text_mask = video_mask.bool(), text_mask.bool()
        if length > t:  # pad clips (zeros, masked out) up to the bucket
            video = F.pad(video, (0, 0, 0, length - t))
            video_mask = F.pad(video_mask, (0, length - t), value=False)
        if text_length > n:  # pad tokens the same way
            text = F.pad(text, (0, 0, 0, text_length - n))
            text_mask = F.pad(text_mask, (0, text_length - n), value=False)
        inputs = (video, video_mask, text, text_mask)
        out = None
        if 0 < text.shape[0] <= self.graph_max_batch and video.is_cuda and not torch.cuda.is_current_stream_capturing():
            out = self._graphed(inputs)
        if out is None:
            out = self._forward(*inputs)
        return {"pred_logits": out["pred_logits"], "pred_spans": out["pred_spans"],
                "saliency_scores": out["saliency_scores"][:, :t], "video_mask": out["video_mask"][:, :t]}


def _precast_weights(model: LDDETR, dtype: torch.dtype) -> int:
    """Store the parameters that only ever feed autocast's lower-precision ops (``nn.Linear`` weights and
    biases, attention in-projections) in ``dtype``: autocast would cast them to exactly these values on every
    use. The Convolutional Blocks keep fp32 (they are BN-folded from fp32), and so do norms and the GRU.
    Returns the number of tensors converted."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            params = [m.weight] + ([m.bias] if m.bias is not None else [])
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            params = [m.in_proj_weight] + ([m.in_proj_bias] if m.in_proj_bias is not None else [])
        else:
            continue
        for p in params:
            p.data = p.data.to(dtype)
            n += 1
    return n


def _strip_training_state(model: LDDETR) -> None:
    """Drop what only training reads: momentum encoders and the Distill-Align queues."""
    model.momentum_video_encoder = None
    model.momentum_text_encoder = None
    da = model.distill_align
    d = da.vid_queue.shape[0]
    da.vid_queue = torch.empty(d, 0, device=da.vid_queue.device)
    da.txt_queue = torch.empty(d, 0, device=da.txt_queue.device)


def build(model_or_checkpoint: LDDETR | str | os.PathLike, *, device: str | torch.device | None = None,
          dtype: torch.dtype = torch.float32, kernels_backend: str = "auto", kernels_precision: str = "auto",
          buckets: Iterable[int] | str | None = "auto", text_buckets: Iterable[int] | str | None = "auto",
          compile: str | None = None, compile_backend: str = "inductor", compile_mode: str | None = None,
          cuda_graphs: bool | str = "auto", graph_max_batch: int = GRAPH_MAX_BATCH,
          precast_weights: bool = True) -> Engine:
    """An inference :class:`Engine` from a reference model (copied; the original is untouched) or a
    checkpoint written by ``engine.train``.

    ``dtype``: float32, or bfloat16/float16 (autocast). ``kernels_backend`` / ``kernels_precision``: see
    :func:`kernels.apply` (fp32 kernel matmul mode; "tf32x3" gives fp32 accuracy on tensor cores). ``buckets``: "auto" (the preset's max video
    length on CUDA, none on CPU), None / () for none, or lengths to pad to; ``text_buckets`` likewise for
    the query length ("auto" on CUDA: multiples of 8 up to ``max_q_l``). ``compile``: None, "decoder"
    (the Loop Decoder) or "model" (the whole forward), each with ``fullgraph=True``; ``compile_mode`` is
    passed to ``torch.compile``. ``cuda_graphs``: "auto" (on CUDA), True or False — capture and replay
    one CUDA graph per input shape for batches up to ``graph_max_batch``. ``precast_weights``: with a half
    ``dtype``, store the linear/attention weights in it once (bit-identical to autocast's per-use casts).
    """
    if compile not in (None, "decoder", "model"):
        raise ValueError(f"compile must be None, 'decoder' or 'model', got {compile!r}")
    if dtype not in (torch.float32,) + HALF:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        model, _ = load_checkpoint(model_or_checkpoint)
    elif isinstance(model_or_checkpoint, LDDETR):
        model = copy.deepcopy(model_or_checkpoint)
    else:
        raise TypeError(f"build expects an LDDETR or a checkpoint path, got {type(model_or_checkpoint).__name__}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval().requires_grad_(False)
    _strip_training_state(model)
    model.to(device)
    kernels.apply(model, kernels_backend, kernels_precision)
    if precast_weights and dtype in HALF:
        _precast_weights(model, dtype)
    for m in model.modules():
        if isinstance(m, TritonConvolutionalBlocks):
            m.fold_bn_torch = True
    if buckets == "auto":
        max_len = model.cfg.max_video_len
        buckets = (max_len,) if device.type == "cuda" and max_len else ()
    buckets = tuple(int(b) for b in (buckets or ()))
    if model.cfg.max_video_len and any(b > model.cfg.max_video_len for b in buckets):
        raise ValueError(f"buckets {buckets} exceed the model's max video length {model.cfg.max_video_len}")
    if text_buckets == "auto":
        max_q = model.cfg.max_q_l
        text_buckets = tuple(sorted({*range(8, max_q, 8), max_q})) if device.type == "cuda" and max_q else ()
    text_buckets = tuple(int(b) for b in (text_buckets or ()))
    if cuda_graphs not in ("auto", True, False):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    if cuda_graphs is True and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}")
    graphs = device.type == "cuda" and cuda_graphs in ("auto", True)
    run = None
    static = bool(buckets)
    if compile == "decoder":
        model.loop_decoder = torch.compile(model.loop_decoder, fullgraph=True, dynamic=not static,
                                           backend=compile_backend, mode=compile_mode)
    elif compile == "model":
        run = torch.compile(model, fullgraph=True, dynamic=not static, backend=compile_backend, mode=compile_mode)
    return Engine(model, dtype=dtype, buckets=buckets, text_buckets=text_buckets, run=run,
                  graph_max_batch=graph_max_batch if graphs else 0)
