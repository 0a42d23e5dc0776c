"""Export LD-DETR: ``python -m export onnx|trt|aoti CKPT [--verify]`` (console script ``ld-detr-export``:
a command literally named ``export`` would lose to the bash/zsh builtin)."""

from .model import INPUT_NAMES, OUTPUT_NAMES, ExportModule, prepare

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "ExportModule", "prepare"]
