"""Clean-room PyTorch LD-DETR: the numerical source of truth of this project.

Public API::

    from reference import LDDETR, LDDETRConfig, convert_official_state_dict
    model = LDDETR(LDDETRConfig.preset("qvhighlights"))
    out = model(video, video_mask, text, text_mask)
"""

from .config import PRESETS, LDDETRConfig
from .convert import convert_official_state_dict, infer_config_overrides
from .distill_align import warmup_alpha
from .model import LDDETR
from .validate import InputError, validate_inputs

__all__ = [
    "LDDETR", "LDDETRConfig", "PRESETS", "convert_official_state_dict", "infer_config_overrides",
    "warmup_alpha", "InputError", "validate_inputs",
]
