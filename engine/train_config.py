"""The training CLI's arguments and the run configuration they resolve to (``python -m engine.train``):
the parser, the datasets and presets, the built-in synthetic job's overrides, ``--set`` parsing, and the data
setup (feature root, annotation files, feature contract) with the config built from it."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import kernels
from reference import PRESETS, LDDETRConfig

from . import cli
from . import distributed as dist_utils
from .data import FeatureSpec, feature_spec_for
from .train_guard import TrainError

DATASETS = ("qvhighlights", "charades", "tacos", "tvsum", "synthetic")
BEST_KEY = "MR-full-mAP"  # model selection, as the official code does for every MR dataset
BEST_KEY_BY_DATASET = {"tvsum": "HL-Top5-mAP"}  # TVSum has no moment labels: select on highlight top-5 mAP

#: The built-in job: a small-but-real LD-DETR (every component, fewer layers) on the synthetic set.
SYNTHETIC_OVERRIDES = dict(
    num_v2t_encoder_layers=1, num_encoder1_layers=1, num_convolutional_blocks=2, num_encoder2_layers=1,
    dim_feedforward=512, queue_length=1024, lr=5e-4, n_epoch=9, bsz=32,
)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _compile_backend(name: str) -> str:
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch.compile backend "
                                         f"(e.g. {', '.join(['eager', 'aot_eager', *torch._dynamo.list_backends()])})")
    return name


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m engine.train", "Train LD-DETR: the built-in synthetic job without data flags, or any "
                   "dataset in the Moment-DETR / QD-DETR feature layout; the best checkpoint is chosen on the "
                   "validation split.",
                   "python -m engine.train --dataset qvhighlights --data-root features/qvhighlight "
                   "--train-file data/highlight_train_release.jsonl --val-file data/highlight_val_release.jsonl "
                   "--out runs/qvhl")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default=None,
                   help="dataset format (default: synthetic without --data-root, else qvhighlights)")
    d.add_argument("--data-root", type=Path, default=None, help="feature root (slowfast_features/, clip_features/, ...)")
    d.add_argument("--train-file", type=Path, default=None, help="train annotation jsonl (default: found in --data-root)")
    d.add_argument("--val-file", type=Path, default=None, help="val annotation jsonl (default: found in --data-root)")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    d.add_argument("--preload", nargs="?", const="fp32", default=None, choices=("fp32", "fp16"),
                   help="hold the train split's features in memory on the training device (optionally fp16) and "
                        "cut batches there: no file reads or workers during training")
    d.add_argument("--synthetic-dir", type=Path, default=None,
                   help="where the built-in synthetic dataset is cached (default: $LD_DETR_CACHE or ~/.cache/ld_detr)")
    m = p.add_argument_group("model / optimisation")
    m.add_argument("--preset", default=None, type=_preset_arg, choices=sorted(PRESETS),
                   help="config preset (default: from --dataset)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any LDDETRConfig field, e.g. --set decoder_loops=1 (repeatable)")
    m.add_argument("--epochs", type=cli.positive_int, default=None, help="default: the preset's n_epoch")
    m.add_argument("--batch-size", type=cli.positive_int, default=None, help="default: the preset's bsz (32)")
    m.add_argument("--lr", type=cli.positive_float, default=None, help="default: the preset's lr (1e-4)")
    m.add_argument("--early-stop", type=int, default=None, metavar="N",
                   help="stop after N evaluations without a better selection metric (<= 0: never; "
                        "default: the preset's max_es_cnt, 200)")
    m.add_argument("--seed", type=int, default=2024)
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, default=Path("runs/ld_detr"),
                   help="a folder: checkpoints, predictions, metrics and logs go there")
    r.add_argument("--resume", type=Path, default=None, help="a latest.pt to continue from")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile (dynamic shapes): on CUDA the model's whole forward (the criterion, backward "
                        "and optimizer stay eager; --cuda-graph captures the step); on CPU only the conv blocks, "
                        "because nothing compiled makes a CPU step faster (measured: engine/train_compile.py)")
    r.add_argument("--compile-backend", default="inductor", type=_compile_backend,
                   help="torch.compile backend with --compile ('eager' only traces: a quick check of the capture)")
    r.add_argument("--dtype", "--amp", dest="dtype", type=cli.dtype_arg, default="fp32", metavar="{fp32,bf16,fp16}",
                   help="training precision: fp32, or bf16 / fp16 autocast")
    r.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only: capture the whole training step (engine.step) once per batch shape and replay "
                        "it; batches padded to fixed length buckets, BatchNorm statistics over valid clips "
                        "(bn_stats=valid; --set bn_stats=all for the official ones)")
    r.add_argument("--kernels", choices=kernels.BACKENDS, default="auto",
                   help="Triton kernels: auto = on CUDA (env LDDETR_KERNELS overrides), triton, or torch")
    cli.add_device(r)
    r.add_argument("--eval-every", type=cli.positive_int, default=1, help="evaluate every N epochs (and after the last)")
    r.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)
    r.add_argument("--debug-dump-queue", action="store_true", help=argparse.SUPPRESS)  # tests: per-rank queue
    cli.add_quiet(r)
    return p


def _preset_arg(value: str) -> str:
    from reference.config import _PRESET_ALIASES

    key = value.lower().replace("-", "_")
    return _PRESET_ALIASES.get(key, key)


def _amp(args: argparse.Namespace) -> str:
    """``--dtype`` as the autocast mode the step takes: "off", "bf16" or "fp16"."""
    return "off" if args.dtype == "fp32" else args.dtype


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    fields = LDDETRConfig.__dataclass_fields__
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise TrainError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key not in fields:
            raise TrainError(f"--set: unknown config field {key!r}")
        typ = type(getattr(LDDETRConfig(), key))
        if typ is bool:
            out[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            try:
                out[key] = typ(value)
            except ValueError:
                raise TrainError(f"--set {key}: cannot read {value!r} as {typ.__name__}") from None
    return out


# ---------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------
@dataclass
class DataSetup:
    dataset: str
    root: Path
    train_file: Path
    val_file: Path
    spec: FeatureSpec


def _find_annotation(root: Path, split: str) -> Path:
    patterns = {"train": ("*train*.jsonl",), "val": ("*val*.jsonl", "*test*.jsonl")}[split]
    for pat in patterns:
        found = sorted(p for p in root.glob(pat) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise TrainError(f"several {split} annotation files in {root}: {[p.name for p in found]}; "
                             f"pass --{split}-file")
    raise TrainError(f"no {split} annotation file (*{split}*.jsonl) in {root}; pass --{split}-file")


def resolve_data(args: argparse.Namespace) -> DataSetup:
    if args.data_root is None and args.train_file is None:
        from .synthetic import ensure_synthetic_dataset

        if args.dataset not in (None, "synthetic"):
            raise TrainError(f"--dataset {args.dataset} needs --data-root (the feature folders)")
        cache = args.synthetic_dir or Path(os.environ.get("LD_DETR_CACHE", Path.home() / ".cache" / "ld_detr")) / "synthetic"
        if dist_utils.is_main():
            ensure_synthetic_dataset(cache)
        dist_utils.barrier()
        return DataSetup("synthetic", cache, cache / "train.jsonl", cache / "val.jsonl", feature_spec_for("synthetic", cache))
    if args.data_root is None:
        raise TrainError("--train-file needs --data-root (the folder holding the feature sub-folders)")
    root = args.data_root
    if not root.is_dir():
        raise TrainError(f"--data-root {root} is not a folder")
    dataset = args.dataset or "qvhighlights"
    train_file = args.train_file or _find_annotation(root, "train")
    val_file = args.val_file or _find_annotation(root, "val")
    for f in (train_file, val_file):
        if not Path(f).is_file():
            raise TrainError(f"annotation file not found: {f}")
    return DataSetup(dataset, root, Path(train_file), Path(val_file), feature_spec_for(dataset, root))


def build_config(args: argparse.Namespace, data: DataSetup) -> LDDETRConfig:
    preset = args.preset or ("qvhighlights" if data.dataset == "synthetic" else data.dataset)
    overrides: dict[str, Any] = dict(SYNTHETIC_OVERRIDES) if data.dataset == "synthetic" else {}
    overrides.update(v_feat_dim=data.spec.v_feat_dim, t_feat_dim=data.spec.t_feat_dim,
                     clip_length=data.spec.clip_length, max_v_l=data.spec.max_v_l, max_q_l=data.spec.max_q_l)
    if getattr(args, "cuda_graph", False):
        overrides["bn_stats"] = "valid"  # bucket padding must not change the math (reference.conv_blocks)
    overrides.update(_parse_overrides(args.overrides))
    for flag, field_name in (("epochs", "n_epoch"), ("batch_size", "bsz"), ("lr", "lr"), ("early_stop", "max_es_cnt")):
        if getattr(args, flag, None) is not None:
            overrides[field_name] = getattr(args, flag)
    try:
        return LDDETRConfig.preset(preset, **overrides)
    except ValueError as e:
        raise TrainError(str(e)) from None
