"""One checkpoint file users pass around (``ckpt.pt``), loadable with ``torch.load(path, weights_only=True)``.

Layout (a plain dict of tensors, numbers, strings, lists and dicts — no pickled code)::

    format            "ld-detr-checkpoint"
    format_version    1
    model             the model state_dict (weights, BN statistics, the Distill Align queues)
    config            LDDETRConfig.to_dict()
    feature_contract  the data contract the model was trained on (feature dirs, dims, clip length, max
                      lengths; see engine.data.FeatureSpec) or None
    epoch, metrics    where and how well it was saved
    versions          ld-detr, torch, python
    checksum          sha256 of the model tensors (names, dtypes, shapes, bytes), verified on load; a
                      checkpoint without one (older files) loads with a warning
    resume            optional: optimiser, scheduler, RNG and loop state for ``--resume`` (training only)

Writes are atomic (temporary file in the same folder, fsync, then ``os.replace``): an interrupted save
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from reference import LDDETR, LDDETRConfig

from .atomic import atomic_open

FORMAT = "ld-detr-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, foreign, or not matching the data/model."""


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("ld-detr")
    except PackageNotFoundError:
        ours = "unknown"
    return {"ld_detr": str(ours), "torch": str(torch.__version__), "python": platform.python_version()}


def tensor_checksum(state: dict[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically (see :mod:`engine.atomic`)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(model: LDDETR, path: str | os.PathLike, *, feature_contract: dict | None = None,
                    epoch: int | None = None, metrics: dict | None = None, resume: dict | None = None,
                    **meta: Any) -> Path:
    """Save ``model`` (eager or a wrapper with ``.module`` / ``._orig_mod``) and its metadata atomically."""
    model = unwrap(model)
    if not isinstance(model, LDDETR):
        raise TypeError(f"save_checkpoint expects an LDDETR model, got {type(model).__name__}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": state,
        "config": model.cfg.to_dict(),
        "feature_contract": feature_contract,
        "epoch": epoch,
        "metrics": metrics or {},
        "versions": library_versions(),
        "meta": meta,
        "checksum": tensor_checksum(state),
    }
    if resume is not None:
        ckpt["resume"] = resume
    atomic_torch_save(ckpt, path)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate the raw checkpoint dict (no model built). Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt file?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    except Exception as e:  # weights_only refuses pickled code: a foreign file
        raise CheckpointError(f"{path}: not an LD-DETR checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = (" (this looks like an official LD-DETR checkpoint: convert it with "
                "reference.convert_official_state_dict)" if isinstance(ckpt, dict) and "model" in ckpt and "opt" in ckpt else "")
        raise CheckpointError(f"{path}: not an LD-DETR checkpoint (format marker missing; top-level keys: {keys}){hint}")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {ckpt['format_version']} is newer than this "
                              f"library supports ({FORMAT_VERSION}); upgrade ld-detr")
    for key in ("model", "config"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    _verify_checksum(ckpt, path)
    return ckpt


def _verify_checksum(ckpt: dict, path: Path) -> None:
    stored = ckpt.get("checksum")
    if stored is None:
        warnings.warn(f"{path}: checkpoint has no checksum (written by an older ld-detr); its weights cannot be "
                      f"verified. Re-save it to add one.", UserWarning, stacklevel=3)
        return
    if not isinstance(ckpt["model"], dict) or tensor_checksum(ckpt["model"]) != stored:
        raise CheckpointError(f"{path}: checksum mismatch: the weights changed after the checkpoint was written "
                              f"(a corrupt copy or a disk error); use another copy")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    config_overrides: dict | None = None) -> tuple[LDDETR, dict]:
    """Build the model a checkpoint describes and load its weights.

    Returns ``(model, meta)`` where ``meta`` is the checkpoint dict without ``model`` (config, feature
    contract, epoch, metrics, versions, resume state if any). ``config_overrides`` may change
    non-structural fields (e.g. ``decoder_loops``).
    """
    ckpt = read_checkpoint(path)
    try:
        cfg = LDDETRConfig.from_dict({**ckpt["config"], **(config_overrides or {})})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config in checkpoint: {e}") from None
    model = LDDETR(cfg)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the model its config describes: "
                              f"{str(e).splitlines()[0]} ...") from None
    model.to(map_location)
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    return model, meta


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The eager LDDETR inside DDP (``.module``) and/or torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
