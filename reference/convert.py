"""Load official LD-DETR checkpoints (``qingchen239/ld-detr``).

The reference model keeps the official module names, so conversion is a near-identity:

* ``txt_position_embed.*`` (3 tensors, 8,704 values) are dropped unless the target model was built with
  ``use_txt_pos=True``: the official model builds the table and never uses it (spec §7.3).
* A ``module.`` prefix (DataParallel/DDP) is stripped; a full official checkpoint dict (``{"model": ...,
  "optimizer": ..., "opt": ...}``) is accepted and its ``model`` entry used.

Official keys with no counterpart: only ``txt_position_embed.*`` (when dropped). The criterion's
``empty_weight`` buffer is not part of the official model state_dict.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

_TXT_POS = "txt_position_embed."


def convert_official_state_dict(sd: Mapping[str, Any], use_txt_pos: bool = False) -> dict[str, torch.Tensor]:
    """Map an official ``state_dict`` (names as in ``official-state-dict.tsv``) to this package's names.

    ``model.load_state_dict(convert_official_state_dict(sd))`` then loads strictly into an
    :class:`~reference.LDDETR` built with the matching config (same input dims, conv blocks, queue length).
    """
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    if not isinstance(sd, Mapping) or not sd:
        raise ValueError("expected an official LD-DETR state_dict (a non-empty mapping of names to tensors)")
    out: dict[str, torch.Tensor] = {}
    for name, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"official state_dict entry {name!r} is a {type(value).__name__}, not a tensor")
        if name.startswith("module."):
            name = name[len("module."):]
        if name.startswith(_TXT_POS) and not use_txt_pos:
            continue
        out[name] = value
    if "distill_align.vid_queue" not in out or "query_embed.weight" not in out:
        raise ValueError("this does not look like an official LD-DETR state_dict: missing "
                         "'distill_align.vid_queue' / 'query_embed.weight'")
    return out


def infer_config_overrides(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the shape-determining config fields off a (converted or official) state_dict."""
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}

    def count(prefix: str) -> int:
        idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    f = "convolutional_fuser."
    return dict(
        v_feat_dim=sd["video_encoder.linear1.weight"].shape[1],
        t_feat_dim=sd["text_encoder.linear1.weight"].shape[1],
        hidden_dim=sd["video_encoder.linear1.weight"].shape[0],
        queue_length=sd["distill_align.vid_queue"].shape[1],
        num_queries=sd["query_embed.weight"].shape[0],
        num_v2t_encoder_layers=count(f + "t2v_encoder.layers."),
        num_encoder1_layers=count(f + "transformer_encoder1.layers."),
        num_convolutional_blocks=count(f + "convolutional_block.blocks."),
        num_encoder2_layers=count(f + "transformer_encoder2.layers."),
        num_decoder_layers=count("loop_decoder.transformer_decoder.layers."),
    )
