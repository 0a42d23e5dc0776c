"""Training CLI: ``python -m engine.train [--compile] [--dtype bf16] ...`` (spec ``ld-detr-code.md`` §4).

With no data flags it trains on the built-in synthetic dataset (generated once and cached), evaluating every
epoch; with ``--data-root`` / ``--train-file`` / ``--val-file`` it trains on any dataset in the standard
Moment-DETR / QD-DETR feature layout. Defaults follow the official recipe: AdamW (lr 1e-4, wd 1e-4, one
parameter group), cosine schedule stepped per epoch, grad-norm clip 0.1, the alpha warm-up of Distill Align
over the first epoch, the best checkpoint chosen by ``MR-full-mAP`` on the validation split.

Written into ``--out``::

    best.pt                 the checkpoint to pass around (engine.load_checkpoint, python -m export ...)
    latest.pt               the last epoch, with the resume state (optimiser, scheduler, RNG, queue)
    best_val_preds.jsonl    validation predictions of the best epoch, official submission format
    metrics.json            best metrics (official key names) + per-epoch history
    train.log, tb/          plain-text log and TensorBoard scalars

Multi-GPU / multi-process: ``torchrun --nproc_per_node=N -m engine.train ...`` (DDP; gloo on CPU).

Both splits are validated before the first step (the check of ``python -m engine.data check``, cached); a
failing evaluation is reported in one line after the epoch's ``latest.pt`` is written; Ctrl-C prints the
``--resume`` command; leftover ``.tmp`` files of a killed checkpoint write are removed on the next start.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

import kernels
from reference import LDDETR, LDDETRConfig, warmup_alpha
from reference.losses import build_criterion

from . import cli
from . import distributed as dist_utils
from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .data import FeatureSpec, MomentDataset, load_annotations, make_loader
from .atomic import remove_stale_tmp, save_json, save_jsonl
from .train_guard import TrainError, any_rank, check_run_flags, error_line, eval_failure, seen_meta, validate_data
from .evaluate import evaluate
from .postprocess import to_records
from .cuda_graph import CudaGraphStep, pad_batch
from .preload import PreloadedLoader
from .step import TrainStep, batch_to_device, lr_to_device_
from .train_compile import compile_for_training
from .step import make_optimizer as make_step_optimizer

log = logging.getLogger("ld_detr.train")

from .train_config import (  # noqa: F401 - re-exported: the CLI's names live in engine.train too
    DATASETS, BEST_KEY, BEST_KEY_BY_DATASET, SYNTHETIC_OVERRIDES, build_parser, _preset_arg, _amp, _parse_overrides, DataSetup, _find_annotation, resolve_data, build_config,
)


def _setup_logging(out: Path, quiet: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(out / "train.log")
    fh.setFormatter(fmt)
    log.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    log.addHandler(sh)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: scalars go to the log only
        log.info("tensorboard is not installed; scalars are only written to train.log")
        return None
    return SummaryWriter(str(out / "tb"))


# ---------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------
def _to_device(batch: dict, device: torch.device) -> dict:
    moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    if "targets" in batch:
        t = batch["targets"]
        moved["targets"] = {k: ([x.to(device) for x in v] if isinstance(v, list) else v.to(device)) for k, v in t.items()}
    return moved


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


CHECK_EVERY = 10  # steps between host reads of the loss (progress bar, non-finite check)


def train_step(run_model, criterion, optimizer, scaler, params: list, batch: dict, *, alpha: float, amp: str,
               device: torch.device, grad_clip: float, compiled: bool = False) -> dict:
    """One optimisation step on a device batch; returns the loss terms as device tensors (nothing is read
    back to the host: the caller decides when). The Hungarian matching's cost transfer is the one copy."""
    # allow_rnn: dynamo traces the highlight head's GRU instead of breaking the graph there
    with _autocast(device, amp), torch._dynamo.config.patch(allow_rnn=compiled):
        outputs = run_model(batch["video"], batch["video_mask"], batch["text"], batch["text_mask"], alpha=alpha)
    outputs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in outputs.items()}
    losses = criterion(outputs, batch["targets"])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return losses


def make_optimizer(params: list, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the official code configures it, with the fused implementation where torch has one for
    this device (one kernel for all parameters, no per-parameter step read-back), else foreach."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader, device: torch.device, cfg: LDDETRConfig, dataset: str,
                   amp: str = "off", progress: bool = False) -> list[dict]:
    """Run ``model`` (eval mode) over a loader and return official submission records.

    A video longer than the clip cap was cut to it by the loader: its windows are scaled by the part the model
    saw (``max_v_l`` x clip length), not by the full duration, with one warning naming the queries."""
    model.eval()
    records: list[dict] = []
    cut: list = []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        meta = seen_meta(batch["meta"], batch["video_mask"].sum(1).tolist(), cfg, cut)
        batch = _to_device(batch, device)
        with _autocast(device, amp):
            out = model(batch["video"], batch["video_mask"], batch["text"], batch["text_mask"])
        records += to_records(out, meta, dataset=dataset, clip_length=cfg.clip_length, nms_thd=cfg.nms_thd,
                              max_before_nms=cfg.max_before_nms, max_after_nms=cfg.max_after_nms)
    if cut:
        import warnings

        warnings.warn(f"{len(cut)} video(s) longer than max_v_l={cfg.max_v_l} clips: the model saw only their first "
                      f"{cfg.max_v_l * cfg.clip_length:g} s and their windows cover only that part (qids "
                      f"{cut[:5]}{' ...' if len(cut) > 5 else ''})", UserWarning, stacklevel=2)
    return records


def _eval_dataset(dataset: str) -> str:
    return "qvhighlights" if dataset == "synthetic" else dataset


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
def train(args: argparse.Namespace, stop_after_epoch: int | None = None) -> dict:
    """Run training as the CLI does; returns the final summary (best metrics, paths).

    ``stop_after_epoch`` ends the run early after that epoch (simulates an interruption in tests).
    """
    device, out = check_run_flags(args)
    distributed = dist_utils.init_from_env(device)
    device = dist_utils.local_device(device)
    main_proc = dist_utils.is_main()
    if main_proc:
        for p in remove_stale_tmp(out):  # a checkpoint write killed with -9 leaves its temporary file
            print(f"removed {p.name}, left by an interrupted write", file=sys.stderr)
        _setup_logging(out, args.quiet)
    else:
        log.handlers.clear()
        log.addHandler(logging.NullHandler())
        log.propagate = False
    try:
        data = resolve_data(args)
        cfg = build_config(args, data)
        validate_data(data, quiet=args.quiet or not main_proc)
        _seed_everything(args.seed)
        resume_ckpt = None
        if args.resume is not None:
            try:
                resume_ckpt = read_checkpoint(args.resume)
            except CheckpointError as e:
                raise TrainError(str(e)) from None
            if "resume" not in resume_ckpt:
                raise TrainError(f"{args.resume} has no resume state (use latest.pt, not best.pt)")
            saved = LDDETRConfig.from_dict(resume_ckpt["config"])
            if saved != cfg:
                diff = {k: (v, getattr(cfg, k)) for k, v in saved.to_dict().items() if getattr(cfg, k) != v}
                raise TrainError(f"--resume {args.resume}: its config differs from this run's (checkpoint, now): {diff}")
            contract = resume_ckpt.get("feature_contract")
            if contract is not None and FeatureSpec.from_dict(contract).to_dict() != data.spec.to_dict():
                raise TrainError(f"--resume {args.resume}: trained on a different feature contract "
                                 f"({contract}) than this data ({data.spec.to_dict()})")

        train_set = MomentDataset(load_annotations(data.train_file), data.root, data.spec, dataset=data.dataset,
                                  load_labels=True, max_windows=cfg.max_windows, seed=args.seed,
                                  cache=data.dataset == "synthetic")
        val_ann = load_annotations(data.val_file)
        val_set = MomentDataset(val_ann, data.root, data.spec, dataset=data.dataset, load_labels=False, seed=args.seed,
                                cache=data.dataset == "synthetic")
        data.spec.check_config(cfg)
        train_loader = make_loader(train_set, cfg.bsz, shuffle=True, num_workers=args.num_workers, seed=args.seed,
                                   device=device, distributed=distributed)
        if args.preload:
            train_loader = PreloadedLoader(train_set, cfg.bsz, device, shuffle=True, seed=args.seed,
                                           fp16=args.preload == "fp16",
                                           sampler=train_loader.sampler if distributed else None)
            log.info(f"preloaded {len(train_set)} train items: {train_loader.nbytes / 2**20:.0f} MiB "
                     f"({args.preload}) on {device} in {train_loader.load_s:.1f} s")
        val_loader = make_loader(val_set, cfg.bsz, shuffle=False, num_workers=args.num_workers, seed=args.seed,
                                 device=device)

        model = kernels.apply(LDDETR(cfg).to(device), args.kernels)
        if distributed:
            model.queue_gather = dist_utils.all_gather_cat
        criterion = build_criterion(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        if isinstance(criterion, torch.nn.Module):
            criterion.to(device)  # the device matcher's map table
        # the one-graph step (engine.step): lr a device tensor, fused AdamW called directly; fp16 keeps the
        # GradScaler loop (its found_inf is read back on the host)
        amp = _amp(args)
        one_graph = amp != "fp16"
        optimizer = (make_step_optimizer if one_graph else make_optimizer)(params, cfg.lr, cfg.wd, device)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.n_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        state = {"epoch": 0, "best": -math.inf, "best_epoch": None, "history": [], "best_metrics": None}
        if resume_ckpt is not None:
            model.load_state_dict(resume_ckpt["model"])
            res = resume_ckpt["resume"]
            optimizer.load_state_dict(res["optimizer"])
            if one_graph:
                lr_to_device_(optimizer, device)
            scheduler.load_state_dict(res["scheduler"])
            scaler.load_state_dict(res["scaler"])
            state.update(res["state"])
            _set_rng_state(res["rng"])
            log.info(f"resumed from {args.resume} after epoch {state['epoch']}")

        run_model: torch.nn.Module = model
        if distributed:
            run_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        if args.compile:
            run_model = compile_for_training(run_model, model, device, args.compile_backend)
        step_fn = TrainStep(run_model, criterion, optimizer, params, grad_clip=cfg.grad_clip, device=device,
                            amp=amp, compiled=args.compile) if one_graph else None
        if args.cuda_graph:
            if device.type != "cuda" or step_fn is None:
                raise TrainError(f"--cuda-graph needs a CUDA device and --dtype fp32/bf16 (got {device}, {cli.dtype_name(args.dtype)})")
            step_fn = CudaGraphStep(step_fn, lambda: [*model.state_dict(keep_vars=True).values(),
                                                      *(t for st in optimizer.state.values() for t in st.values())])

        if main_proc:
            log.info(f"dataset {data.dataset} ({data.root}): {len(train_set)} train / {len(val_set)} val queries; "
                     f"device {device}{' x' + str(dist_utils.world_size()) if distributed else ''}; dtype {args.dtype}; "
                     f"compile {args.compile}; kernels {args.kernels} -> "
                     f"{kernels.resolve_backend(args.kernels, device)}")
            log.info(f"model: {model.num_parameters():,} trainable parameters; decoder_loops {cfg.decoder_loops}; "
                     f"{cfg.n_epoch} epochs, batch {cfg.bsz}, lr {cfg.lr}")
            save_json(cfg.to_dict(), out / "config.json", indent=2)
        writer = _tensorboard(out) if main_proc else None
        eval_dataset = _eval_dataset(data.dataset)
        best_key = BEST_KEY_BY_DATASET.get(data.dataset, BEST_KEY)
        first_step_done = False

        for epoch in range(state["epoch"], cfg.n_epoch):
            model.train()
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            steps = len(train_loader)
            if args.max_steps_per_epoch:
                steps = min(steps, args.max_steps_per_epoch)
            sums: dict[str, float] = {}
            nonfinite = None
            t_epoch = time.perf_counter()
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.n_epoch}", leave=False,
                       disable=args.quiet or not main_proc, dynamic_ncols=True)
            data_wait, t_ready = 0.0, time.perf_counter()
            for step, batch in enumerate(train_loader):
                if step >= steps:
                    break
                t0 = time.perf_counter()
                data_wait += t0 - t_ready  # time the step waited for this batch
                alpha = warmup_alpha(cfg.distillation_coefficient, epoch, step, steps)
                try:
                    if step_fn is not None:
                        step_fn.set_alpha(alpha)
                        batch = batch_to_device(batch, device)
                        if args.cuda_graph:  # fixed shapes: the capped length (or steps of 32 clips), max_q_l tokens
                            v_len = cfg.max_video_len or -(-batch["video"].shape[1] // 32) * 32
                            batch = pad_batch(batch, v_len, cfg.max_q_l)
                        losses = step_fn(batch)
                    else:
                        losses = train_step(run_model, criterion, optimizer, scaler, params, _to_device(batch, device),
                                            alpha=alpha, amp=amp, device=device, grad_clip=cfg.grad_clip,
                                            compiled=args.compile)
                except FloatingPointError as e:  # NaN predictions reach the matcher before the deferred check
                    raise TrainError(f"non-finite loss at epoch {epoch + 1} step {step}: {e}") from None
                loss = losses["loss"]
                # the finiteness check reads a flag back every CHECK_EVERY steps, not every step (a host sync)
                nonfinite = ~torch.isfinite(loss) if nonfinite is None else nonfinite | ~torch.isfinite(loss)
                if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
                    if bool(nonfinite):
                        terms = {k: float(v) for k, v in losses.items()}
                        raise TrainError(f"non-finite loss at epoch {epoch + 1} within steps "
                                         f"{step + 1 - CHECK_EVERY}..{step} (last step's terms: {terms})")
                    nonfinite = None
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
                if not first_step_done:
                    first_step_done = True
                    if main_proc:
                        log.info(f"first step {time.perf_counter() - t0:.1f} s"
                                 f"{' (includes torch.compile)' if args.compile else ''}")
                if step % CHECK_EVERY == 0 or step + 1 == steps:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                bar.update(1)
                t_ready = time.perf_counter()
            bar.close()
            scheduler.step()
            train_time = time.perf_counter() - t_epoch
            means = {k: float(v) / max(1, steps) for k, v in sums.items()}
            state["epoch"] = epoch + 1
            entry: dict[str, Any] = {"epoch": epoch + 1, "train_time_s": round(train_time, 2),
                                     "steps_per_s": round(steps / max(train_time, 1e-9), 3),
                                     "data_wait_s": round(data_wait, 3),
                                     "loss": {k: round(v, 5) for k, v in means.items()}}
            if main_proc:
                log.info(f"epoch {epoch + 1}: loss {means.get('loss', float('nan')):.4f} "
                         f"({steps} steps, {steps / max(train_time, 1e-9):.2f} it/s; waited {data_wait:.2f} s for data, "
                         f"loader {steps / max(data_wait, 1e-9):.1f} batches/s)")
                if writer is not None:
                    for k, v in means.items():
                        writer.add_scalar(f"train/{k}", v, epoch + 1)
                    writer.add_scalar("train/lr", float(optimizer.param_groups[0]["lr"]), epoch + 1)

            last = epoch + 1 == cfg.n_epoch or (stop_after_epoch is not None and epoch + 1 >= stop_after_epoch)
            eval_error, metrics = None, None
            if main_proc and ((epoch + 1) % args.eval_every == 0 or last):
                t_eval = time.perf_counter()
                try:
                    records = predict_loader(model, val_loader, device, cfg, data.dataset, amp)
                    metrics = evaluate(records, val_ann, dataset=eval_dataset)
                except (ValueError, RuntimeError) as e:  # reported after latest.pt is written, below
                    eval_error = e
            if metrics is not None:
                state["since_best"] = state.get("since_best", 0) + 1
                brief = metrics["brief"]
                entry["metrics"] = brief
                entry["eval_time_s"] = round(time.perf_counter() - t_eval, 2)
                log.info(f"epoch {epoch + 1} val: " + ", ".join(f"{k} {v}" for k, v in brief.items()
                                                               if k in (best_key, "MR-full-R1@0.5", "MR-full-R1@0.7", "HL-min-VeryGood-mAP")))
                if writer is not None:
                    for k, v in brief.items():
                        writer.add_scalar(f"val/{k}", v, epoch + 1)
                score = brief.get(best_key, -math.inf)
                if score > state["best"]:
                    state.update(best=score, best_epoch=epoch + 1, best_metrics=brief, since_best=0)
                    save_checkpoint(model, out / "best.pt", feature_contract=data.spec.to_dict(), epoch=epoch + 1,
                                    metrics=brief, dataset=data.dataset)
                    save_jsonl(records, out / "best_val_preds.jsonl")
                    save_json(metrics, out / "best_val_metrics_full.json")
                    log.info(f"new best {best_key} {score} -> {out / 'best.pt'}")
            state["history"].append(entry)
            if main_proc:
                resume = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "state": state, "rng": _rng_state()}
                save_checkpoint(model, out / "latest.pt", feature_contract=data.spec.to_dict(), epoch=epoch + 1,
                                metrics=entry.get("metrics", {}), resume=resume, dataset=data.dataset)
                save_json({"best_epoch": state["best_epoch"], "best": state["best_metrics"], "history": state["history"]},
                          out / "metrics.json")
            dist_utils.barrier()
            if any_rank(eval_error is not None, device):
                raise TrainError(eval_failure(epoch + 1, eval_error, out))
            if any_rank(main_proc and 0 < cfg.max_es_cnt <= state.get("since_best", 0), device):
                log.info(f"early stop: no better {best_key} in the last {cfg.max_es_cnt} evaluation(s) "
                         f"(--early-stop {cfg.max_es_cnt}); best epoch {state['best_epoch']}")
                break
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        if writer is not None:
            writer.close()
        if args.debug_dump_queue:
            torch.save(model.distill_align.vid_queue.cpu(), out / f"queue_rank{dist_utils.rank()}.pt")
        summary = {"best_epoch": state["best_epoch"], "best": state["best_metrics"], "out": str(out)}
        if main_proc:
            log.info(f"done: best {best_key} {state['best']} at epoch {state['best_epoch']}; checkpoint {out / 'best.pt'}")
        return summary
    finally:
        # Free the DDP wrapper (and what holds it) before the process group goes: its C++ Reducer would
        # otherwise drop the group's last reference while holding the GIL, and gloo's destructor then waits
        # on a worker thread that needs the GIL to free a tensor — a hang at exit (pytorch/pytorch#56297).
        run_model = step_fn = None  # noqa: F841
        gc.collect()
        dist_utils.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = train(args)
    except KeyboardInterrupt:
        latest = Path(args.out) / "latest.pt"
        how = (f"continue with the same command plus --resume {latest}" if latest.is_file()
               else "no epoch finished, so there is nothing to resume")
        print(f"\ninterrupted: {how}", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except Exception as e:
        line = error_line(e)
        if line is None:
            raise
        return cli.fail(line)
    if dist_utils.is_main() and summary["best"]:
        print(json.dumps(summary["best"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
