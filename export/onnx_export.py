"""ONNX export (``torch.onnx.export(dynamo=True)``) with named inputs/outputs, dynamic batch / video length /
text length, the config and feature contract as model metadata, optional onnxslim, atomic write."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from .model import INPUT_NAMES, OUTPUT_NAMES, Prepared, example_inputs


def export_onnx(prepared: Prepared, out: str | os.PathLike, *, opset: int | None = None, dynamic: bool = True,
                batch: int = 1, max_video_len: int | None = None, text_len: int = 32,
                simplify: bool = False, half: bool = False, dtype: str = "fp32") -> Path:
    """Write ``out`` (.onnx). ``dynamic``: batch, video length (2..max_video_len) and text length are
    symbolic; otherwise the graph is fixed at (batch, max_video_len, text_len) and shorter videos/queries are
    passed padded with their masks (the model is padding-invariant). ``dtype`` "fp16" / "bf16" (``half``:
    "fp16"): weights, features and outputs in that type (masks stay bool; every additive mask in the model is
    finite in fp16). ``max_video_len`` defaults to the model's clip cap; an uncapped model needs it."""
    import onnx

    from engine.cli import DTYPES

    from .formats import video_len

    dtype = "fp16" if half else dtype
    cfg = prepared.cfg
    t = video_len(cfg, max_video_len)
    module = prepared.module
    if dtype != "fp32":  # native half weights; the fused model keeps its fp32 islands (reference points, bounds)
        module = copy.deepcopy(module)
        inner = module.model
        inner.to_dtype(DTYPES[dtype]) if hasattr(inner, "to_dtype") else inner.to(DTYPES[dtype])
    x = example_inputs(cfg, max(batch, 2) if dynamic else batch, t, text_len, dtype=DTYPES[dtype])
    kwargs = {}
    if dynamic:
        b_dim = torch.export.Dim("batch", min=1, max=4096)
        t_dim = torch.export.Dim("video_len", min=2, max=cfg.max_video_len or t)
        n_dim = torch.export.Dim("text_len", min=1, max=1024)
        kwargs["dynamic_shapes"] = ({0: b_dim, 1: t_dim}, {0: b_dim, 1: t_dim}, {0: b_dim, 1: n_dim},
                                    {0: b_dim, 1: n_dim})
    from kernels.gru import onnx_translation_table  # the fused model's GRU op -> one ONNX GRU node

    torch._dynamo.reset()  # earlier torch.compile calls in this process must not leak specialisations into export
    with torch.no_grad():
        program = torch.onnx.export(module, x, dynamo=True, input_names=list(INPUT_NAMES),
                                    output_names=list(OUTPUT_NAMES), opset_version=opset, verbose=False,
                                    custom_translation_table=onnx_translation_table(), **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        program.save(str(raw))
        model = onnx.load(str(raw))
        if simplify:
            import onnxslim

            model = onnxslim.slim(model)
        for key, value in {**prepared.metadata, "ld_detr.precision": dtype}.items():
            model.metadata_props.add(key=key, value=value)
        final = Path(tmp) / out.name
        onnx.save(model, str(final))
        onnx.checker.check_model(str(final))
        os.replace(final, out)  # atomic: no half-written .onnx
    return out


def onnx_runner(path: str | os.PathLike):
    """A callable (video, video_mask, text, text_mask) -> tuple of numpy outputs, on onnxruntime's CPU EP."""
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    # float inputs are cast to what the graph takes (fp16 for a --half export)
    types = {i.name: ("float16" if i.type == "tensor(float16)" else None) for i in session.get_inputs()}

    def run(*inputs):
        feed = {}
        for n, v in zip(INPUT_NAMES, inputs):
            a = v.numpy()
            feed[n] = a.astype(types[n]) if types.get(n) and a.dtype.kind == "f" else a
        return session.run(list(OUTPUT_NAMES), feed)

    return run
