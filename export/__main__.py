"""``python -m export onnx|trt|aoti CKPT [options]`` (console script: ``ld-detr-export``).

One table (FORMATS) drives the sub-commands, their help and the dispatch. Every format writes atomically,
embeds or sits next to the config and feature contract, and ``--verify`` compares the artifact with PyTorch
on fresh random inputs (three video lengths, one unseen at export, and two batch sizes).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path

FORMATS = {  # name: (suffix, what it writes)
    "onnx": (".onnx", "ONNX (torch.onnx.export dynamo=True), onnxruntime verification"),
    "trt": (".engine", "TensorRT engine via the ONNX parser (TensorRT 10/11, CUDA)"),
    "aoti": (".pt2", "torch.export + AOTInductor package (torch._inductor.aoti_load_package); the video length "
                     "is static: pad shorter videos, their masks carry the lengths"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="format", metavar="{" + ",".join(FORMATS) + "}")
    for name, (suffix, what) in FORMATS.items():
        s = sub.add_parser(name, help=what, description=what)
        s.add_argument("ckpt", type=Path, help="a checkpoint written by engine.train (best.pt)")
        s.add_argument("--out", type=Path, default=None, help=f"output file (default: CKPT with {suffix})")
        s.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                       help="symbolic batch, video length and text length (default: on)")
        s.add_argument("--batch", type=int, default=1, help="batch size of a static graph")
        s.add_argument("--max-video-len", type=int, default=None, help="default: the model's max video length")
        s.add_argument("--text-len", type=int, default=32, help="text length of a static graph / example")
        s.add_argument("--verify", action="store_true", help="compare with PyTorch on fresh random inputs")
        s.add_argument("--data-root", type=Path, default=None,
                       help="with --verify: also evaluate artifact and PyTorch on this feature root's split and "
                            "print the metric deltas")
        s.add_argument("--split", default="val", help="with --data-root: the *{split}*.jsonl annotation file")
        s.add_argument("--ann", type=Path, default=None, help="with --data-root: the annotation file (overrides --split)")
        s.add_argument("--max-queries", type=int, default=None, help="with --data-root: evaluate the first N queries")
        s.add_argument("--metric-tol", type=float, default=1.0,
                       help="with --data-root: largest allowed |delta| of a metric, in points (default 1.0)")
        if name in ("onnx", "trt"):
            s.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
        if name == "onnx":
            s.add_argument("--simplify", action="store_true", help="run onnxslim on the graph")
            s.add_argument("--half", action="store_true",
                           help="fp16 weights, features and outputs (verified against fp32 PyTorch at 1e-2 relative)")
        if name == "aoti":
            s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                           help="device the package is compiled for and runs on (default: cpu)")
        if name == "trt":
            prec = s.add_mutually_exclusive_group()
            prec.add_argument("--fp16", action="store_true")
            prec.add_argument("--bf16", action="store_true")
            s.add_argument("--workspace", type=float, default=4.0, help="builder workspace, GB")
            s.add_argument("--shapes", default="1x2/1x75/32x75",
                           help="batch x video length for min/opt/max of the optimisation profile")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in FORMATS:
        near = difflib.get_close_matches(argv[0], FORMATS, n=1)
        print(f"unknown format {argv[0]!r}" + (f"; did you mean {near[0]!r}?" if near else "")
              + f" (formats: {', '.join(FORMATS)})", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args.format is None:
        build_parser().print_help()
        return 2
    from engine.checkpoint import CheckpointError

    from .backends import MissingDependency

    try:
        return _run(args)
    except (MissingDependency, CheckpointError) as e:  # a bad input: one line, no traceback
        print(f"export {args.format}: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .model import prepare
    from .verify import format_rows, verify

    if args.format == "trt":
        from .backends import require_tensorrt

        require_tensorrt()  # fail before the (slow) ONNX export
    if not args.ckpt.is_file():
        print(f"export: checkpoint not found: {args.ckpt}", file=sys.stderr)
        return 2
    if args.data_root is not None and not (args.verify and args.dynamic):
        print("export: --data-root needs --verify and a dynamic-batch artifact (the default --dynamic)", file=sys.stderr)
        return 2
    device = getattr(args, "device", "cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("export aoti: --device cuda needs a CUDA GPU (none visible to torch)", file=sys.stderr)
            return 2
        # true fp32 (no TF32) in the package and in the PyTorch side of --verify
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    prepared = prepare(args.ckpt, device=device)
    limit = prepared.cfg.max_video_len or 75
    t = args.max_video_len or limit
    if not 2 <= t <= limit:
        print(f"export: --max-video-len {t} exceeds the model's max video length {limit} (or is < 2)", file=sys.stderr)
        return 2
    out = args.out or args.ckpt.with_suffix(FORMATS[args.format][0])
    start = time.perf_counter()
    print(f"exporting {args.ckpt} -> {out} ({args.format}, {'dynamic' if args.dynamic else 'static'} shapes)")
    if args.format == "onnx":
        from .onnx_export import export_onnx, onnx_runner

        export_onnx(prepared, out, opset=args.opset, dynamic=args.dynamic, batch=args.batch, max_video_len=t,
                    text_len=args.text_len, simplify=args.simplify, half=args.half)
        runner = onnx_runner
    elif args.format == "aoti":
        from .backends import aoti_runner, export_aoti

        export_aoti(prepared, out, dynamic=args.dynamic, batch=args.batch, max_video_len=t, text_len=args.text_len)
        out.with_suffix(".json").write_text(json.dumps(prepared.metadata, indent=1))
        runner = lambda path: aoti_runner(path, device)  # noqa: E731
    else:
        from .backends import build_trt_engine, trt_runner
        from .onnx_export import export_onnx

        onnx_path = export_onnx(prepared, out.with_suffix(".onnx"), opset=args.opset, dynamic=True,
                                max_video_len=t, text_len=args.text_len)
        (b0, t0), (b1, t1), (b2, t2) = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split("/")]
        n = args.text_len
        shapes = {"video": ((b0, t0, prepared.cfg.v_feat_dim), (b1, t1, prepared.cfg.v_feat_dim), (b2, t2, prepared.cfg.v_feat_dim)),
                  "video_mask": ((b0, t0), (b1, t1), (b2, t2)),
                  "text": ((b0, 1, prepared.cfg.t_feat_dim), (b1, n, prepared.cfg.t_feat_dim), (b2, n, prepared.cfg.t_feat_dim)),
                  "text_mask": ((b0, 1), (b1, n), (b2, n))}
        precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
        build_trt_engine(onnx_path, out, precision=precision, workspace_gb=args.workspace, shapes=shapes)
        runner = trt_runner
    size = out.stat().st_size
    if size == 0:
        print(f"export: {out} is empty", file=sys.stderr)
        return 1
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    if args.verify:
        result = verify(prepared, runner(out), dynamic=args.dynamic or args.format == "trt", batch=args.batch,
                        max_video_len=t, text_len=args.text_len, static_video=args.format == "aoti",
                        tol=1e-2 if getattr(args, "half", False) else 1e-4, half=getattr(args, "half", False))
        print(format_rows(result))
        if not result["ok"]:
            print(f"verification FAILED (tolerance {result['tol']:.0e} relative)", file=sys.stderr)
            return 1
        print(f"verification passed (every output within {result['tol']:.0e} relative)")
        if args.data_root is not None:
            from .metrics import MetricsError, format_deltas, metric_deltas

            static = t if args.format == "aoti" else None  # aoti: the video length is static
            try:
                deltas = metric_deltas(prepared, runner(out), args.data_root, split=args.split, ann=args.ann,
                                       static_video_len=static, max_queries=args.max_queries)
            except MetricsError as e:
                print(f"export: {e}", file=sys.stderr)
                return 2
            print(format_deltas(deltas))
            worst = max((abs(v) for v in deltas["delta"].values()), default=0.0)
            if worst > args.metric_tol:
                print(f"metric check FAILED: a metric moved by {worst:.2f} points (> --metric-tol {args.metric_tol})",
                      file=sys.stderr)
                return 1
            print(f"metric check passed (largest |delta| {worst:.2f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
