"""What keeps ``engine.train`` from losing work or answering wrongly: the checks before the first step (flags,
device, output folder, both data splits through the shared check), the one-line messages after a failure, the
rank-wide flags for evaluation failures and early stopping, and the duration of videos cut by the clip cap."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from . import cli
from . import distributed as dist_utils
from .checkpoint import CheckpointError
from .data_check import check_dataset, first_problem
from .features import DataError


class TrainError(RuntimeError):
    """A problem the user can fix (bad flags, mismatching data); printed without a traceback."""


def check_run_flags(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """The device and an output folder that can be written, or TrainError before any work is done."""
    try:
        device = cli.resolve_device(args.device)
        cli.check_writable(args.out, is_dir=True)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if args.resume is not None and not Path(args.resume).is_file():
        raise TrainError(f"--resume {args.resume}: checkpoint not found")
    return device, Path(args.out)


def validate_data(data, quiet: bool = True) -> None:
    """Both splits through the check of ``python -m engine.data check`` (labels required; scan cached)
    before the first step; TrainError naming the first problem."""
    for split, path in (("train", data.train_file), ("val", data.val_file)):
        report = check_dataset(data.dataset, data.root, [path], data.spec, max_examples=1, progress=not quiet,
                               labels=True)
        if not report["clean"]:
            raise TrainError(f"{split} data: {first_problem(report)}; see python -m engine.data check --dataset "
                             f"{data.dataset} --data-root {data.root} --ann {path}")


def eval_failure(epoch: int, error: BaseException | None, out: Path) -> str:
    what = " ".join(str(error).split()) if error is not None else "on another rank"
    return (f"evaluation after epoch {epoch} failed: {what}; the epoch's weights are saved in {out / 'latest.pt'} "
            f"(continue with --resume {out / 'latest.pt'})")


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over the ranks (the main rank decides evaluation and early stopping)."""
    if not dist_utils.is_distributed():
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def seen_meta(meta: list[dict], n_clips: list[int], cfg, cut: list) -> list[dict]:
    """``meta`` with the duration of each capped video replaced by the seconds the model saw."""
    cap = cfg.max_video_len
    if cap is None:
        return meta
    seen = cap * cfg.clip_length
    out = []
    for m, n in zip(meta, n_clips):
        if n >= cap and float(m["duration"]) > seen + cfg.clip_length:
            cut.append(m["qid"])
            m = {**m, "duration": seen}
        out.append(m)
    return out


def error_line(e: BaseException) -> str | None:
    """The one line printed for an error the user can act on; None for a bug (the traceback is kept)."""
    worker = cli.worker_error_line(e)  # a DataLoader worker's error arrives wrapped, its traceback as text
    if worker is not None:
        return "in a DataLoader worker: " + re.sub(r"^(\w+\.)+(?=\w+: )", "", worker)  # engine.x.DataError -> DataError
    if isinstance(e, (TrainError, DataError, CheckpointError)):
        return str(e)
    if isinstance(e, OSError):
        return cli.os_error_line(e)
    return None
