"""Prediction: ``python -m engine.predict --ckpt best.pt --data-root R --split val --out preds.jsonl``.

From a video file: ``python -m engine.predict --ckpt best.pt --video clip.mp4 --query "..."`` (see
:mod:`engine.predict_video`; videos of any length are scored in overlapping windows, :mod:`engine.windows`).

Also a Python API for already-extracted features of one video and several queries (the video is
encoded once)::

    from engine.predict import Predictor
    predictor = Predictor.from_checkpoint("runs/ld_detr/best.pt")
    results = predictor.predict({"slowfast_features": sf, "clip_features": clip},   # (T, D) arrays
                                [query_tokens_1, query_tokens_2], queries=["a man ...", "..."])
    results[0]["windows"]   # [[start_s, end_s, score], ...] sorted by score
    results[0]["saliency"]  # one score per clip

Features are given raw (as stored in the feature files); the predictor applies the checkpoint's feature
contract (L2 normalisation, truncation, TEF) exactly as training did. ``--plot DIR`` writes one PNG per
query: the saliency curve, the predicted windows and, when known, the ground truth.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

import kernels
from reference import LDDETR, validate_inputs

from . import cli
from .atomic import atomic_open, save_jsonl
from .checkpoint import CheckpointError, load_checkpoint
from .data import DataError, FeatureSpec, MomentDataset, find_split, load_annotations, make_loader, prepare_text, prepare_video
from .evaluate import evaluate
from .inference import build
from .postprocess import to_records
from .predict_video import add_video_args, predict_video, predict_windows, video_main
from .windows import DEFAULT_NMS


def _compile_mode(compile: bool | str | None) -> str | None:
    """``compile=`` of the API / ``--compile`` -> what :func:`engine.inference.build` takes."""
    if compile is None or compile is False:
        return None
    return "model" if compile is True else compile


class Predictor:
    """A loaded model plus its feature contract, ready for raw features.

    ``dtype``: "fp32" | "bf16" | "fp16" (or a torch dtype), ``compile``: None / False, True (= "model"): both
    passed to :func:`engine.inference.build`. ``dataset`` picks the official post-processing (QVHighlights /
    Charades clamp to 150 s, TACoS does not; Charades / TACoS results carry no saliency).
    """

    def __init__(self, model: LDDETR, spec: FeatureSpec, dataset: str = "qvhighlights",
                 device: str | torch.device | None = None, backend: str = "auto",
                 dtype: str | torch.dtype = "fp32", compile: bool | str | None = None, *,
                 kernels_backend: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backend = kernels_backend or backend  # old name, kept as an alias
        self.model = build(model, device=self.device, backend=backend, dtype=cli.to_dtype(dtype),
                           compile=_compile_mode(compile))  # inference engine (the fused model)
        self.spec = spec
        self.dataset = dataset
        spec.check_config(model.cfg)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        backend: str = "auto", dtype: str | torch.dtype = "fp32",
                        compile: bool | str | None = None, *, kernels_backend: str | None = None) -> "Predictor":
        model, meta = load_checkpoint(path)
        contract = meta.get("feature_contract")
        if contract is None:
            raise CheckpointError(f"{path}: checkpoint has no feature contract; cannot prepare raw features")
        dataset = (meta.get("meta") or {}).get("dataset", "qvhighlights")
        return cls(model, FeatureSpec.from_dict(contract), dataset=dataset, device=device,
                   backend=kernels_backend or backend, dtype=dtype, compile=compile)

    def _duration(self, video: Mapping[str, Any] | np.ndarray, duration: float | None) -> float:
        """Seconds the model's windows are scaled by: the given duration, or T x clip length; a video longer
        than the clip cap is cut to it with a warning (the windows then cover only its beginning)."""
        clip = self.spec.clip_length
        arrays = list(video.values()) if isinstance(video, Mapping) else [video]
        t_raw = min(int(np.shape(a)[0]) for a in arrays) if arrays else 0
        if duration is not None:
            try:
                duration = float(duration)
            except (TypeError, ValueError):
                raise ValueError(f"predict: duration must be a number of seconds, got {duration!r}") from None
            if not (duration > 0 and math.isfinite(duration)):
                raise ValueError(f"predict: duration must be a finite number of seconds > 0, got {duration}")
            if t_raw and abs(duration - t_raw * clip) > 2 * clip:
                warnings.warn(f"predict: duration {duration:g} s disagrees with the video's {t_raw} clips x {clip:g} s "
                              f"= {t_raw * clip:g} s; the windows are scaled by {duration:g} s", UserWarning, stacklevel=3)
        dur = duration if duration is not None else t_raw * clip
        cap = self.spec.max_video_len
        if cap is not None and t_raw > cap:
            warnings.warn(f"predict: the video has {t_raw} clips, more than the model's max_v_l={cap}: only its first "
                          f"{cap * clip:g} s are seen, and the windows cover only that part", UserWarning, stacklevel=3)
            dur = min(dur, cap * clip)
        return dur

    def predict(self, video: Mapping[str, Any] | np.ndarray, query_tokens: Sequence[np.ndarray | torch.Tensor],
                queries: Sequence[str] | None = None, duration: float | None = None, *, window: int | None = None,
                stride: int | None = None, nms_thd: float = DEFAULT_NMS) -> list[dict]:
        """:meth:`_predict_once` for a video of any length: longer than ``window`` clips (default max_v_l;
        uncapped: ``engine.windows.default_window``) it is scored in overlapping windows and merged."""
        return predict_windows(self, video, query_tokens, queries, duration, window=window, stride=stride,
                               nms_thd=nms_thd)

    def predict_video(self, path: str | os.PathLike, queries: Sequence[str], **kwargs: Any) -> dict:
        """A video file + query strings -> windows and saliency (see :func:`engine.predict_video.predict_video`)."""
        return predict_video(self, path, queries, **kwargs)

    @torch.no_grad()
    def _predict_once(self, video: Mapping[str, Any] | np.ndarray, query_tokens: Sequence[np.ndarray | torch.Tensor],
                      queries: Sequence[str] | None = None, duration: float | None = None) -> list[dict]:
        """One video (at most max_v_l clips), several queries -> one result dict per query.

        ``video``: {feature dir name: (T, D) array} as stored on disk, or one (T, D) array when the contract
        has a single video feature. ``query_tokens``: per query a (N, Dt) token-feature array.
        ``duration`` defaults to T * clip_length; NaN / <= 0 is refused. A video longer than the model's clip
        cap is cut to it with a warning (windows cover only the part the model saw).
        """
        if len(query_tokens) == 0:
            raise ValueError("predict: no queries given")
        if queries is not None and len(queries) != len(query_tokens):
            raise ValueError(f"predict: {len(queries)} query strings for {len(query_tokens)} query feature arrays")
        dur = self._duration(video, duration)
        v = torch.from_numpy(prepare_video(video, self.spec, name="video"))[None]  # (1, T, Dv)
        texts = [prepare_text(np.asarray(q, dtype=np.float32), self.spec, name=f"query {i}")
                 for i, q in enumerate(query_tokens)]
        n = max(len(t) for t in texts)
        text = torch.zeros(len(texts), n, texts[0].shape[1])
        text_mask = torch.zeros(len(texts), n, dtype=torch.bool)
        for i, t in enumerate(texts):
            text[i, : len(t)] = torch.from_numpy(t)
            text_mask[i, : len(t)] = True
        video_mask = torch.ones(1, v.shape[1], dtype=torch.bool)
        ids = list(queries) if queries is not None else list(range(len(texts)))
        validate_inputs(v.expand(len(texts), -1, -1), video_mask.expand(len(texts), -1), text, text_mask, ids=ids)
        out = self.model(v.to(self.device), video_mask.to(self.device), text.to(self.device), text_mask.to(self.device))
        meta = [{"qid": i, "query": (queries[i] if queries is not None else ""), "vid": "", "duration": dur}
                for i in range(len(texts))]
        recs = to_records(out, meta, dataset=self.dataset, clip_length=self.spec.clip_length)
        return [{"query": r["query"], "windows": r["pred_relevant_windows"], "saliency": r.get("pred_saliency_scores")}
                for r in recs]


# ---------------------------------------------------------------------------------------------------
def plot_prediction(record: dict, gt: dict | None, clip_length: float, path: Path) -> None:
    """One PNG: saliency curve, top predicted windows, ground-truth windows when known."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'ld-detr[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sal = record.get("pred_saliency_scores") or []
    fig, ax = plt.subplots(figsize=(8, 2.6), dpi=100)
    if sal:
        t = (np.arange(len(sal)) + 0.5) * clip_length
        ax.plot(t, sal, color="tab:blue", lw=1.5, label="predicted saliency")
    for i, (st, ed, score) in enumerate(record["pred_relevant_windows"][:3]):
        ax.axvspan(st, ed, color="tab:orange", alpha=0.45 if i == 0 else 0.15,
                   label=f"predicted top-{i + 1} ({score:.2f})")
    if gt is not None:
        for j, (st, ed) in enumerate(gt.get("relevant_windows") or []):
            ax.axvspan(st, ed, ymin=0.0, ymax=0.08, color="tab:green", label="ground truth" if j == 0 else None)
    ax.set_xlabel("time (s)")
    ax.set_title(f"qid {record['qid']}: {str(record.get('query', ''))[:90]}", fontsize=9)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def build_parser():
    p = cli.parser("python -m engine.predict", __doc__.split("\n\n")[0],
                   "python -m engine.predict --ckpt runs/qvhl/best.pt --data-root features/qvhighlight --split val "
                   "--out preds.jsonl")
    p.add_argument("--ckpt", type=Path, required=True, help="a checkpoint written by engine.train (best.pt)")
    p.add_argument("--data-root", type=Path, default=None, help="feature root of the data to predict on")
    p.add_argument("--split", default="val", help="which annotation file in --data-root (*{split}*.jsonl)")
    p.add_argument("--ann", type=Path, default=None, help="annotation jsonl (overrides --split)")
    p.add_argument("--out", type=Path, default=None,
                   help="a file: the predictions, official submission jsonl (required with --data-root); "
                        "with --video: a JSON file (default: stdout)")
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--dtype", type=cli.dtype_arg, default="fp32", metavar="{fp32,bf16,fp16}",
                   help="inference precision (native bf16 / fp16 weights and activations)")
    p.add_argument("--compile", action="store_true", help="torch.compile the whole forward (fullgraph)")
    cli.add_device(p)
    p.add_argument("--kernels", choices=kernels.BACKENDS, default="auto",
                   help="Triton kernels: auto = on CUDA (env LDDETR_KERNELS overrides), triton, or torch")
    p.add_argument("--plot", type=Path, default=None, help="a folder: one PNG per query")
    p.add_argument("--max-plots", type=int, default=50, help="at most this many PNGs")
    cli.add_quiet(p)
    add_video_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.video is None and (args.data_root is None or args.out is None):
        parser.error("--data-root and --out are required (or give --video)")
    try:
        device = cli.resolve_device(args.device)
        if args.out is not None:
            cli.check_writable(args.out)
        if args.plot is not None:
            cli.check_writable(args.plot, is_dir=True)
        with warnings.catch_warnings(record=True) as caught:  # e.g. a half dtype this CPU runs slowly: one line
            warnings.simplefilter("always")
            predictor = Predictor.from_checkpoint(args.ckpt, device=device, backend=args.kernels,
                                                  dtype=args.dtype, compile=args.compile)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        if args.video is not None:
            return video_main(args, predictor)
        ann_file = args.ann or find_split(args.data_root, args.split)
        ann = load_annotations(ann_file)
        ds = MomentDataset(ann, args.data_root, predictor.spec, dataset=predictor.dataset, load_labels=False)
        loader = make_loader(ds, args.batch_size, shuffle=False, num_workers=0, seed=0, device=predictor.device)
        from .train import predict_loader

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = predict_loader(predictor.model, loader, predictor.device, predictor.model.cfg,
                                     predictor.dataset, progress=not args.quiet)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        save_jsonl(records, args.out)
        if not args.quiet:
            print(f"wrote {len(records)} predictions to {args.out}", file=sys.stderr)
        has_gt = all(a.get("relevant_windows") for a in ann)
        if has_gt:
            ds_name = "qvhighlights" if predictor.dataset == "synthetic" else predictor.dataset
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # padding notes: the evaluate CLI prints them
                print(json.dumps(evaluate(records, ann, dataset=ds_name)["brief"], indent=2))
        if args.plot is not None:
            args.plot.mkdir(parents=True, exist_ok=True)
            by_qid = {a["qid"]: a for a in ann}
            for r in records[: args.max_plots]:
                plot_prediction(r, by_qid.get(r["qid"]) if has_gt else None, predictor.spec.clip_length,
                                args.plot / f"qid{r['qid']}.png")
            if not args.quiet:
                print(f"wrote {min(len(records), args.max_plots)} plots to {args.plot}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except OSError as e:
        return cli.fail(cli.os_error_line(e))
    except (DataError, CheckpointError, ValueError) as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
