"""Engine: data, evaluation, training, prediction, checkpoints.

Python API::

    from engine import save_checkpoint, load_checkpoint
    model, meta = load_checkpoint("runs/ld_detr/best.pt")
    eng = build("runs/ld_detr/best.pt", dtype="bf16")   # the fused inference engine (engine.inference)
"""

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .inference import Engine, build

__all__ = ["CheckpointError", "Engine", "build", "load_checkpoint", "read_checkpoint", "save_checkpoint"]
