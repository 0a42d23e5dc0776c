"""The fused inference model: LD-DETR computed with less work, built from a reference model's weights.

See :mod:`engine.fused.model`. ``engine.inference.build`` wraps it into the inference engine.
"""

from .model import FusedLDDETR

__all__ = ["FusedLDDETR"]
