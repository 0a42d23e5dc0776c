"""The one export format table: it drives the sub-commands, their options, the argument checks (all run
before the slow export) and ``--help`` (ultralytics' ``export_formats()`` pattern).

Each :class:`Format` names its suffix, the precisions and devices it supports, the format-only options
(keys of :data:`OPTIONS`) and how its shapes behave (``static_video``: one exported video length, shorter
videos padded; ``always_dynamic``: dynamic shapes whatever ``--dynamic`` says). The exporter of each format
is ``export.__main__.EXPORTERS[name]``.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from pathlib import Path

#: maximum video length of an export from an uncapped model (Charades / TACoS presets: ``max_v_l <= 0``)
UNCAPPED_DEFAULT_LEN = 1024
#: verification tolerance (relative L2 error vs fp32 PyTorch) per precision
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    help: str
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    options: tuple[str, ...] = ()
    static_video: bool = False
    always_dynamic: bool = False
    trace_on_cpu: bool = False  # the model is traced on the CPU whatever --device is (trt: via ONNX)
    dependency: str | None = None  # an optional package checked before the export (export.backends.require)

    @property
    def default_device(self) -> str:
        return self.devices[0]


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", ".onnx", "ONNX (torch.onnx.export dynamo=True), verified with onnxruntime",
           dtypes=("fp32", "fp16"), devices=("cpu",), options=("opset", "simplify")),
    Format("trt", ".engine", "TensorRT engine via the ONNX parser (TensorRT 10/11, CUDA); the precision is the "
                             "ONNX graph's own (a strongly typed network)",
           dtypes=("fp32", "fp16", "bf16"), devices=("cuda",), options=("opset", "workspace", "shapes"),
           always_dynamic=True, trace_on_cpu=True, dependency="tensorrt"),
    Format("aoti", ".pt2", "torch.export + AOTInductor package (torch._inductor.aoti_load_package); the video "
                           "length is static: pad shorter videos, their masks carry the lengths",
           dtypes=("fp32",), devices=("cpu", "cuda"), static_video=True),
)}

#: format-only options: name -> (flags, add_argument keywords)
OPTIONS: dict[str, tuple[tuple[str, ...], dict]] = {
    "opset": (("--opset",), dict(type=int, default=None, help="ONNX opset (default: the exporter's)")),
    "simplify": (("--simplify",), dict(action="store_true", help="run onnxslim on the graph")),
    "workspace": (("--workspace",), dict(type=float, default=4.0, help="builder workspace, GB")),
    "shapes": (("--shapes",), dict(default=None, metavar="BxT/BxT/BxT",
                                   help="batch x video length of the optimisation profile's min/opt/max "
                                        "(default: 1x2/1xL/32xL, L = --max-video-len)")),
}


def nearest_format(name: str) -> str:
    near = difflib.get_close_matches(name, FORMATS, n=1)
    return (f"unknown format {name!r}" + (f"; did you mean {near[0]!r}?" if near else "")
            + f" (formats: {', '.join(FORMATS)})")


def video_len(cfg, requested: int | None) -> int:
    """The export's maximum video length: the model's clip cap (``--max-video-len`` may lower it) or, for an
    uncapped model, ``--max-video-len`` (default :data:`UNCAPPED_DEFAULT_LEN`). ValueError when out of range."""
    cap = cfg.max_video_len
    t = requested if requested is not None else (cap or UNCAPPED_DEFAULT_LEN)
    if cap is not None and t > cap:
        raise ValueError(f"--max-video-len {t} exceeds the model's max video length {cap} (its max_v_l)")
    if t < 2:
        raise ValueError(f"--max-video-len must be >= 2, got {t}")
    return t


def parse_shapes(text: str, max_len: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``"1x2/1x75/32x75"`` -> ((1, 2), (1, 75), (32, 75)): min <= opt <= max per dim, 2 <= T <= ``max_len``."""
    parts = text.split("/")
    try:
        dims = [tuple(int(v) for v in p.lower().split("x")) for p in parts]
    except ValueError:
        dims = []
    if len(parts) != 3 or len(dims) != 3 or any(len(d) != 2 for d in dims):
        raise ValueError(f"--shapes {text!r}: expected BxT/BxT/BxT (min/opt/max batch x video length), "
                         f"e.g. 1x2/1x{max_len}/32x{max_len}")
    (b0, t0), (b1, t1), (b2, t2) = dims
    if min(b0, b1, b2) < 1:
        raise ValueError(f"--shapes {text!r}: batch sizes must be >= 1")
    if min(t0, t1, t2) < 2 or max(t0, t1, t2) > max_len:
        raise ValueError(f"--shapes {text!r}: video lengths must be in [2, {max_len}] (--max-video-len)")
    if not (b0 <= b1 <= b2 and t0 <= t1 <= t2):
        raise ValueError(f"--shapes {text!r}: need min <= opt <= max in both batch and video length")
    return (b0, t0), (b1, t1), (b2, t2)


def validate(fmt: Format, args: argparse.Namespace, cfg) -> dict:
    """Every check that can fail, before the export starts. Returns the resolved settings
    ``{"dtype", "device", "max_video_len", "shapes", "out", "tol"}``; ValueError otherwise."""
    from engine.cli import check_writable

    dtype = args.dtype
    if dtype not in fmt.dtypes:
        raise ValueError(f"--dtype {dtype}: {fmt.name} supports {', '.join(fmt.dtypes)}")
    device = args.device or fmt.default_device
    if device not in fmt.devices:
        raise ValueError(f"--device {device}: {fmt.name} runs on {', '.join(fmt.devices)}")
    if args.data_root is not None and not (args.verify and args.dynamic):
        raise ValueError("--data-root needs --verify and a dynamic-batch artifact (the default --dynamic)")
    t = video_len(cfg, args.max_video_len)
    shapes = parse_shapes(args.shapes or f"1x2/1x{t}/32x{t}", t) if "shapes" in fmt.options else None
    if args.batch < 1 or args.text_len < 1:
        raise ValueError(f"--batch and --text-len must be >= 1, got {args.batch} and {args.text_len}")
    out = Path(args.out) if args.out is not None else Path(args.ckpt).with_suffix(fmt.suffix)
    check_writable(out)
    return {"dtype": dtype, "device": device, "max_video_len": t, "shapes": shapes, "out": out,
            "tol": TOLERANCE[dtype]}
