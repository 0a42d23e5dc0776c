"""``python -m export onnx|trt|aoti CKPT [options]`` (console script: ``ld-detr-export``).

One table (:data:`export.formats.FORMATS`) drives the sub-commands, their options, the checks (all done
before the export starts) and the help. Every format writes atomically, embeds or sits next to the config
and feature contract, and ``--verify`` compares the artifact with PyTorch on fresh random inputs (three
video lengths, one unseen at export, and two batch sizes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine import cli

from .formats import FORMATS, OPTIONS, Format, nearest_format, validate
from .progress import progress

EXAMPLES = {
    "onnx": "python -m export onnx runs/qvhl/best.pt --out model.onnx --verify",
    "trt": "python -m export trt runs/qvhl/best.pt --dtype fp16 --verify",
    "aoti": "python -m export aoti runs/qvhl/best.pt --device cuda --verify",
}


def _add_format(sub, fmt: Format) -> None:
    s = sub.add_parser(fmt.name, help=fmt.help, description=fmt.help, formatter_class=cli.HelpFormatter,
                       epilog=f"example:\n  {EXAMPLES[fmt.name]}\n\nexit codes: 0 ok, 1 check/verify failed, "
                              f"2 bad input")
    s.add_argument("ckpt", type=Path, metavar="CKPT", help="a checkpoint written by engine.train (best.pt)")
    s.add_argument("--out", type=Path, default=None, help=f"a file: the artifact (default: CKPT with {fmt.suffix})")
    s.add_argument("--dtype", default="fp32", choices=fmt.dtypes,
                   help="precision of the artifact's weights, features and outputs")
    for alias, value in (("--half", "fp16"), ("--fp16", "fp16"), ("--bf16", "bf16")):  # old spellings, hidden
        s.add_argument(alias, dest="dtype", action="store_const", const=value, help=argparse.SUPPRESS)
    s.add_argument("--device", default=None, choices=fmt.devices,
                   help=f"where the artifact is built and runs (default: {fmt.default_device})")
    s.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                   help="symbolic batch, video length and text length (default: on)")
    s.add_argument("--batch", type=int, default=1, help="batch size of a static graph")
    s.add_argument("--max-video-len", "--max-v-l", dest="max_video_len", type=int, default=None,
                   help="longest video the artifact takes (default: the model's max_v_l; 1024 for an uncapped "
                        "model)")
    s.add_argument("--text-len", type=int, default=32, help="text length of a static graph / example")
    for name in fmt.options:
        flags, kwargs = OPTIONS[name]
        s.add_argument(*flags, **kwargs)
    s.add_argument("--verify", action="store_true", help="compare with PyTorch on fresh random inputs")
    s.add_argument("--data-root", type=Path, default=None,
                   help="with --verify: also evaluate artifact and PyTorch on this feature root's split and print "
                        "the metric deltas")
    s.add_argument("--split", default="val", help="with --data-root: the *{split}*.jsonl annotation file")
    s.add_argument("--ann", type=Path, default=None, help="with --data-root: the annotation file (overrides --split)")
    s.add_argument("--max-queries", type=int, default=None, help="with --data-root: evaluate the first N queries")
    s.add_argument("--metric-tol", type=float, default=1.0,
                   help="with --data-root: largest allowed |delta| of a metric, in points")
    cli.add_quiet(s)


def build_parser():
    p = cli.parser("python -m export", __doc__.splitlines()[0], EXAMPLES["onnx"])
    sub = p.add_subparsers(dest="format", metavar="{" + ",".join(FORMATS) + "}")
    for fmt in FORMATS.values():
        _add_format(sub, fmt)
    return p


def main(argv=None) -> int:
    argv = cli.argv_list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in FORMATS:
        print(f"python -m export: error: {nearest_format(argv[0])}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    args = build_parser().parse_args(argv)
    if args.format is None:
        build_parser().print_help()
        return cli.EXIT_BAD_INPUT
    from engine.checkpoint import CheckpointError

    from .backends import MissingDependency
    from .metrics import MetricsError

    try:
        return _run(FORMATS[args.format], args)
    except KeyboardInterrupt:
        print(f"\nexport {args.format}: interrupted; nothing was written", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except (MissingDependency, CheckpointError, MetricsError, ValueError) as e:  # bad input: one line
        return cli.fail(e, prog=f"export {args.format}")
    except OSError as e:
        return cli.fail(cli.os_error_line(e), prog=f"export {args.format}")


def _run(fmt: Format, args) -> int:
    from .model import prepare

    if not args.ckpt.is_file():
        raise ValueError(f"checkpoint not found: {args.ckpt}")
    device = args.device or fmt.default_device
    if device == "cuda" and not fmt.trace_on_cpu:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda needs a CUDA GPU (none visible to torch)")
        # true fp32 (no TF32) in the artifact and in the PyTorch side of --verify
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    prepared = prepare(args.ckpt, device="cpu" if fmt.trace_on_cpu else device)
    settings = validate(fmt, args, prepared.cfg)  # every argument check, before the slow export
    if fmt.dependency is not None:
        from . import backends

        backends.require(fmt.dependency)  # also before the ONNX export
    out, t = settings["out"], settings["max_video_len"]
    start = time.perf_counter()
    if not args.quiet:
        print(f"exporting {args.ckpt} -> {out} ({fmt.name}, {settings['dtype']}, "
              f"{'dynamic' if args.dynamic else 'static'} shapes, videos up to {t} clips)")
    runner = _export(fmt, args, prepared, settings)
    size = out.stat().st_size
    if size == 0:
        print(f"export {fmt.name}: {out} is empty", file=sys.stderr)
        return cli.EXIT_FAILED
    if not args.quiet:
        print(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    if args.verify:
        return _verify(fmt, args, prepared, settings, runner)
    return cli.EXIT_OK


def _export(fmt: Format, args, prepared, settings):
    """Write the artifact with the format's exporter; returns a function path -> runner for --verify."""
    return EXPORTERS[fmt.name](args, prepared, settings)


def _export_onnx(args, prepared, settings):
    from .onnx_export import export_onnx, onnx_runner

    with progress("ONNX export (torch.onnx.export, dynamo)", args.quiet):
        export_onnx(prepared, settings["out"], opset=args.opset, dynamic=args.dynamic, batch=args.batch,
                    max_video_len=settings["max_video_len"], text_len=args.text_len, simplify=args.simplify,
                    dtype=settings["dtype"])
    return onnx_runner


def _export_aoti(args, prepared, settings):
    from engine.atomic import save_json

    from .backends import aoti_runner, export_aoti

    out = settings["out"]
    with progress("torch.export + AOTInductor compile (minutes of C++ compilation)", args.quiet):
        export_aoti(prepared, out, dynamic=args.dynamic, batch=args.batch, max_video_len=settings["max_video_len"],
                    text_len=args.text_len)
    save_json(prepared.metadata, out.with_suffix(".json"), indent=1)
    return lambda path: aoti_runner(path, settings["device"])


def _export_trt(args, prepared, settings):
    from . import backends
    from .onnx_export import export_onnx

    out, dtype = settings["out"], settings["dtype"]
    with progress(f"ONNX export for TensorRT ({dtype} graph)", args.quiet):
        onnx_path = export_onnx(prepared, out.with_suffix(".onnx"), opset=args.opset, dynamic=True,
                                max_video_len=settings["max_video_len"], text_len=args.text_len, dtype=dtype)
    with progress("TensorRT engine build", args.quiet):
        backends.build_trt_engine(onnx_path, out, precision=dtype, workspace_gb=args.workspace,
                                  shapes=trt_shapes(settings["shapes"], prepared.cfg, args.text_len))
    return backends.trt_runner


EXPORTERS = {"onnx": _export_onnx, "aoti": _export_aoti, "trt": _export_trt}


def trt_shapes(shapes, cfg, text_len: int) -> dict:
    """Optimisation-profile shapes of every input from the (min, opt, max) (batch, video length) pairs."""
    (b0, t0), (b1, t1), (b2, t2) = shapes
    dv, dt, n = cfg.v_feat_dim, cfg.t_feat_dim, text_len
    return {"video": ((b0, t0, dv), (b1, t1, dv), (b2, t2, dv)), "video_mask": ((b0, t0), (b1, t1), (b2, t2)),
            "text": ((b0, 1, dt), (b1, n, dt), (b2, n, dt)), "text_mask": ((b0, 1), (b1, n), (b2, n))}


def _verify(fmt: Format, args, prepared, settings, runner) -> int:
    from .verify import format_rows, verify

    out, t, tol = settings["out"], settings["max_video_len"], settings["tol"]
    half = settings["dtype"] != "fp32"
    result = verify(prepared, runner(out), dynamic=args.dynamic or fmt.always_dynamic, batch=args.batch,
                    max_video_len=t, text_len=args.text_len, static_video=fmt.static_video, tol=tol, half=half)
    print(format_rows(result))
    if not result["ok"]:
        print(f"verification FAILED (tolerance {result['tol']:.0e} relative)", file=sys.stderr)
        return cli.EXIT_FAILED
    print(f"verification passed (every output within {result['tol']:.0e} relative)")
    if args.data_root is None:
        return cli.EXIT_OK
    from .metrics import format_deltas, metric_deltas

    static = t if fmt.static_video else None
    deltas = metric_deltas(prepared, runner(out), args.data_root, split=args.split, ann=args.ann,
                           static_video_len=static, max_queries=args.max_queries)
    print(format_deltas(deltas))
    worst = max((abs(v) for v in deltas["delta"].values()), default=0.0)
    if worst > args.metric_tol:
        print(f"metric check FAILED: a metric moved by {worst:.2f} points (> --metric-tol {args.metric_tol})",
              file=sys.stderr)
        return cli.EXIT_FAILED
    print(f"metric check passed (largest |delta| {worst:.2f} points)")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
