"""One config dataclass for LD-DETR, with the official per-dataset presets.

Spec: ``ld-detr-code.md`` §1.1 (global defaults) and §1.2 (per-dataset scripts). Field names follow the
official argparse options where one exists. Only :class:`reference.model.LDDETR` and the loss builder read
this object; every submodule takes explicit numbers.

Departures from the official options (all documented in the README):

* ``decoder_loops`` (official ``num_decoder_loops``) really loops; ``decoder_loops=1`` is what the
  released code runs (its ``return`` sits inside the loop, spec §7.1.1).
* ``matcher="device"`` (the default) solves the Hungarian matching exactly on the device for all decoder
  layers at once (:func:`reference.matcher.assign_min_cost`); ``matcher="scipy"`` is the official host solver.
* ``bn_stats="valid"`` takes training BatchNorm statistics over valid clips only (used with fixed length
  buckets, ``--cuda-graph``); ``"all"`` (default) is the official behaviour (:mod:`reference.conv_blocks`).
* ``use_txt_pos=False`` (the default) builds no text positional table; the official model builds one and
  never uses it (8,704 dead parameters, spec §7.3).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any


@dataclass
class LDDETRConfig:
    # ---- inputs (feature contract) -------------------------------------------------------------
    v_feat_dim: int = 2818  # video input dim INCLUDING the 2 TEF channels (SlowFast 2304 + CLIP 512 + 2)
    t_feat_dim: int = 512  # CLIP per-token text features
    max_v_l: int = 75  # max clips per video; <= 0 means "no cap" (official -1 for Charades/TACoS)
    max_q_l: int = 32  # max query tokens
    clip_length: float = 2.0  # seconds per feature clip
    dset_name: str = "hl"

    # ---- model -----------------------------------------------------------------------------------
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.1  # transformer / decoder dropout
    input_dropout: float = 0.5  # unimodal encoders
    v2t_dropout: float = 0.1  # V2T extractor score inputs
    num_queries: int = 10
    num_v2t_encoder_layers: int = 2  # the T2V cross-attention layers (official option name)
    num_encoder1_layers: int = 2
    num_convolutional_blocks: int = 5
    bn_stats: str = "all"  # training BN statistics: "all" positions (official) or "valid" clips only
    num_encoder2_layers: int = 2
    num_decoder_layers: int = 2
    decoder_loops: int = 3  # paper eq. 29-31; 1 reproduces the released code
    use_txt_pos: bool = False
    aux_loss: bool = True

    # ---- Distill Align ---------------------------------------------------------------------------
    queue_length: int = 65536
    momentum: float = 0.995
    distillation_coefficient: float = 0.4  # alpha
    temperature: float = 0.07  # initial value of the learnable tau

    # ---- losses ----------------------------------------------------------------------------------
    span_loss_type: str = "l1"
    span_loss_coef: float = 10.0
    giou_loss_coef: float = 1.0
    label_loss_coef: float = 4.0
    align_loss_coef: float = 0.6
    sim_loss_coef: float = 0.6
    lw_saliency: float = 1.0
    saliency_margin: float = 0.2
    eos_coef: float = 0.1  # registered by the official code but unused (the label loss is focal)
    set_cost_class: float = 4.0
    set_cost_span: float = 10.0
    set_cost_giou: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    rac_temperature: float = 0.5

    # ---- optimisation (read by engine/) ----------------------------------------------------------
    lr: float = 1e-4
    wd: float = 1e-4
    n_epoch: int = 250
    bsz: int = 32
    grad_clip: float = 0.1
    max_es_cnt: int = 200
    max_windows: int = 5
    matcher: str = "device"  # "device": exact, batched, on the costs' device; "scipy": the official host solver

    # ---- post-processing -------------------------------------------------------------------------
    nms_thd: float = -1.0
    max_before_nms: int = 10
    max_after_nms: int = 10

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_dim % self.nheads:
            problems.append(f"hidden_dim={self.hidden_dim} must be divisible by nheads={self.nheads}")
        if self.hidden_dim != 256:
            # The DAB anchor sine embedding is 128 channels per coordinate (spec §2.6): hard-wired to d=256.
            problems.append(f"hidden_dim must be 256 (the decoder's anchor sine embedding is 2x128), got {self.hidden_dim}")
        for name in ("v_feat_dim", "t_feat_dim", "num_queries", "num_decoder_layers", "decoder_loops",
                     "queue_length", "max_q_l"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_v2t_encoder_layers", "num_encoder1_layers", "num_encoder2_layers",
                     "num_convolutional_blocks"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.momentum <= 1.0:
            problems.append(f"momentum must be in [0, 1], got {self.momentum}")
        if self.clip_length <= 0:
            problems.append(f"clip_length must be > 0, got {self.clip_length}")
        if self.span_loss_type != "l1":
            problems.append(f"span_loss_type: only 'l1' is implemented (as in the official release), got {self.span_loss_type!r}")
        if self.bn_stats not in ("all", "valid"):
            problems.append(f"bn_stats must be 'all' (official) or 'valid', got {self.bn_stats!r}")
        if self.matcher not in ("device", "scipy"):
            problems.append(f"matcher must be 'device' or 'scipy', got {self.matcher!r}")
        if problems:
            raise ValueError("invalid LDDETRConfig: " + "; ".join(problems))

    # ---------------------------------------------------------------------------------------------
    @property
    def max_video_len(self) -> int | None:
        """The clip cap, or None when uncapped (``max_v_l <= 0``)."""
        return self.max_v_l if self.max_v_l > 0 else None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LDDETRConfig":
        """Build the config of a named preset (see :data:`PRESETS`), with field overrides."""
        key = name.lower().replace("-", "_")
        key = _PRESET_ALIASES.get(key, key)
        if key not in PRESETS:
            hint = difflib.get_close_matches(key, list(PRESETS), n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}.{extra}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            hints = {u: difflib.get_close_matches(u, sorted(fields), n=1) for u in unknown}
            raise ValueError(f"unknown LDDETRConfig field(s) {unknown}; close matches: {hints}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LDDETRConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown LDDETRConfig field(s) {unknown}")
        return cls(**d)


#: Per-dataset presets (spec §1.2). TVSum has no official script; the paper says its hyper-parameters
#: "were not recorded", so it uses the defaults with the standard TVSum I3D features (2048 + 2 TEF).
PRESETS: dict[str, dict[str, Any]] = {
    "qvhighlights": dict(dset_name="hl"),
    "charades": dict(
        dset_name="charadesSTA", n_epoch=100, clip_length=1.0, max_v_l=-1, num_convolutional_blocks=4,
        distillation_coefficient=0.3, sim_loss_coef=0.4, lw_saliency=1.5,
    ),
    "tacos": dict(dset_name="tacos", max_v_l=-1, distillation_coefficient=0.7, lw_saliency=4.0),
    "tvsum": dict(dset_name="tvsum", v_feat_dim=2050),
}

_PRESET_ALIASES = {"hl": "qvhighlights", "qvhl": "qvhighlights", "charadessta": "charades",
                   "charades_sta": "charades"}

__all__ = ["LDDETRConfig", "PRESETS"]

