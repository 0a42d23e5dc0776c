"""AOTInductor and TensorRT back ends (ONNX is in onnx_export.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .model import Prepared, example_inputs


class MissingDependency(RuntimeError):
    """An optional package the chosen format needs is not installed (the CLI exits with code 2)."""


# ---------------------------------------------------------------------------------------------------------
# AOTInductor: torch.export + an AOTInductor package (.pt2), loadable with torch._inductor.aoti_load_package
# ---------------------------------------------------------------------------------------------------------
def _dynamic_shapes():
    """Symbolic batch and text length; the video length stays static (torch.export specialises it), so a
    shorter video is padded to the exported length with its mask, which is exact (padding-invariant model).

    ``Dim.DYNAMIC`` (not a named ``Dim`` with a range): on CUDA the attention kernels add guards such as
    ``min(N, 8 N) == N`` that the range solver cannot prove and rejects; DYNAMIC keeps them as runtime checks."""
    dyn = getattr(torch.export.Dim, "DYNAMIC", None)
    b = dyn if dyn is not None else torch.export.Dim("batch", min=1, max=4096)
    n = dyn if dyn is not None else torch.export.Dim("text_len", min=1, max=1024)
    return ({0: b}, {0: b}, {0: b, 1: n}, {0: b, 1: n})


def export_program(prepared: Prepared, *, dynamic: bool, batch: int, max_video_len: int, text_len: int):
    """torch.export of the inference module (the first half of the AOTInductor path)."""
    x = example_inputs(prepared.cfg, max(batch, 2) if dynamic else batch, max_video_len, text_len,
                       device=prepared.device)
    torch._dynamo.reset()  # earlier torch.compile calls in this process must not leak into export
    with torch.no_grad():
        return torch.export.export(prepared.module, x, dynamic_shapes=_dynamic_shapes() if dynamic else None)


def export_aoti(prepared: Prepared, out: str | os.PathLike, *, dynamic: bool = True, batch: int = 1,
                max_video_len: int | None = None, text_len: int = 32) -> Path:
    """``max_video_len``: the static video length (default: the model's clip cap)."""
    from .formats import video_len

    program = export_program(prepared, dynamic=dynamic, batch=batch, max_video_len=video_len(prepared.cfg, max_video_len),
                             text_len=text_len)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_path = Path(tmp) / out.name
        # pattern_matcher off: inductor's SDPA pattern rewrite (fuse_attention) mis-broadcasts on this model
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path),
                                                 inductor_configs={"pattern_matcher": False})
        os.replace(tmp_path, out)  # atomic
    return out


def aoti_runner(path: str | os.PathLike, device: str = "cpu"):
    """numpy outputs from CPU tensors in (the package runs on the device it was compiled for)."""
    compiled = torch._inductor.aoti_load_package(os.fspath(path))

    def run(*inputs):
        with torch.no_grad():
            return [o.cpu().numpy() for o in compiled(*(x.to(device) for x in inputs))]

    return run


# ---------------------------------------------------------------------------------------------------------
# TensorRT: ONNX -> engine through the TensorRT Python API (10 and 11), optimisation profiles
# ---------------------------------------------------------------------------------------------------------
def require(package: str):
    """The optional ``package`` a format needs (only "tensorrt"), or MissingDependency."""
    if package != "tensorrt":
        raise ValueError(f"unknown export dependency {package!r}")
    return require_tensorrt()


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependency("tensorrt is not installed: `pip install tensorrt` on a machine with an NVIDIA GPU "
                                "and CUDA (TensorRT 10 or 11)") from None
    if not torch.cuda.is_available():
        raise MissingDependency("TensorRT needs a CUDA GPU; none is visible")
    return trt


def build_trt_engine(onnx_path: str | os.PathLike, out: str | os.PathLike, *, precision: str = "fp32",
                     workspace_gb: float = 4.0, shapes: dict[str, tuple[tuple, tuple, tuple]], trt=None) -> Path:
    """Parse the ONNX file and build a serialized engine. ``shapes``: input name -> (min, opt, max) shapes.

    ``precision`` is the ONNX graph's own type ("fp32", or "fp16" / "bf16" for a half export): the network is
    strongly typed, so TensorRT 10 and 11 alike build exactly that precision (11 dropped the FP16/BF16 builder
    flags; on 10 a flag over an fp32 graph would let it pick fp32 layers anyway). ``trt``: the tensorrt module
    (tests pass a stub)."""
    trt = trt or require_tensorrt()
    network, config, builder = trt_network_and_config(trt, onnx_path, precision=precision, workspace_gb=workspace_gb,
                                                      shapes=shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.trt.tmp")
    try:
        tmp.write_bytes(bytes(serialized))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def trt_network_and_config(trt, onnx_path: str | os.PathLike, *, precision: str, workspace_gb: float,
                           shapes: dict[str, tuple[tuple, tuple, tuple]]):
    """(network, builder config, builder) for the ONNX file: strongly typed where TensorRT has the flag
    (>= 9), else the FP16/BF16 builder flag for a half precision; one optimisation profile from ``shapes``."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    return network, config, builder


def trt_runner(path: str | os.PathLike):
    """A callable over a serialized engine (TensorRT 10+ tensor-address API), inputs/outputs as torch CUDA tensors."""
    from .model import INPUT_NAMES, OUTPUT_NAMES

    trt = require_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    context = engine.create_execution_context()
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}

    def run(*inputs):
        # float features go in as the engine's own input type (fp16 / bf16 for a half engine)
        feeds = {n: (t.to(dtypes.get(engine.get_tensor_dtype(n), t.dtype)) if t.is_floating_point() else t)
                 .cuda().contiguous() for n, t in zip(INPUT_NAMES, inputs)}
        for n, t in feeds.items():
            context.set_input_shape(n, tuple(t.shape))
            context.set_tensor_address(n, t.data_ptr())
        outs = {}
        for n in OUTPUT_NAMES:
            outs[n] = torch.empty(tuple(context.get_tensor_shape(n)), device="cuda",
                                  dtype=dtypes.get(engine.get_tensor_dtype(n), torch.float32))
            context.set_tensor_address(n, outs[n].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [outs[n].float().cpu().numpy() for n in OUTPUT_NAMES]

    return run
