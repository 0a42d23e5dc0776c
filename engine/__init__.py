"""Engine: data, evaluation, training, prediction, checkpoints.

Python API::

    from engine import save_checkpoint, load_checkpoint
    model, meta = load_checkpoint("runs/ld_detr/best.pt")
"""

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "read_checkpoint", "save_checkpoint"]
