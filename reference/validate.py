"""Input checks with clear messages.

* :func:`check_input_shapes` — free (no host sync); :class:`~reference.model.LDDETR` calls it in every
  forward.
* :func:`validate_inputs` — value checks (NaN/inf, masks that are not 0/1 prefixes, samples with no
  valid clip or token). They need a host sync, so the data loader and the prediction entry points call
  them, not the hot forward.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class InputError(ValueError):
    """Bad model input (shape, dim, length or value), with a message naming what is wrong."""


def as_bool_mask(mask: Tensor) -> Tensor:
    """Accept bool masks or {0, 1} numeric masks (True / 1 = valid)."""
    return mask if mask.dtype == torch.bool else mask > 0.5


def check_input_shapes(video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor, *,
                       v_feat_dim: int, t_feat_dim: int, max_v_l: int | None = None,
                       max_q_l: int | None = None) -> None:
    """Shape-only checks (no host sync). Raises :class:`InputError`."""
    for name, x in (("video", video), ("text", text)):
        if x.dim() != 3:
            raise InputError(f"{name} must be (B, T, D), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"{name} must be a float tensor, got {x.dtype}")
    if video.shape[-1] != v_feat_dim:
        raise InputError(f"video feature dim: expected {v_feat_dim} (v_feat_dim, including the 2 TEF "
                         f"channels), got {video.shape[-1]} (video shape {tuple(video.shape)})")
    if text.shape[-1] != t_feat_dim:
        raise InputError(f"text feature dim: expected {t_feat_dim} (t_feat_dim), got {text.shape[-1]} "
                         f"(text shape {tuple(text.shape)})")
    if video.shape[0] != text.shape[0] and video.shape[0] != 1:
        raise InputError(f"batch size differs: video {video.shape[0]} vs text {text.shape[0]} "
                         f"(a single video (1, T, D) may be paired with several queries)")
    for name, x, m in (("video", video, video_mask), ("text", text, text_mask)):
        if tuple(m.shape) != tuple(x.shape[:2]):
            raise InputError(f"{name}_mask shape {tuple(m.shape)} does not match {name} (B, T) = {tuple(x.shape[:2])}")
    if video.shape[1] == 0 or text.shape[1] == 0:
        raise InputError(f"empty input: video length {video.shape[1]}, text length {text.shape[1]}")
    if max_v_l is not None and video.shape[1] > max_v_l:
        raise InputError(f"video has {video.shape[1]} clips, above the configured maximum max_v_l={max_v_l}; "
                         f"truncate the features (the data loader does) or raise max_v_l")
    if max_q_l is not None and text.shape[1] > max_q_l:
        raise InputError(f"text has {text.shape[1]} tokens, above the configured maximum max_q_l={max_q_l}")


def validate_inputs(video: Tensor, video_mask: Tensor, text: Tensor, text_mask: Tensor, *,
                    ids: Sequence | None = None, v_feat_dim: int | None = None, t_feat_dim: int | None = None,
                    max_v_l: int | None = None) -> None:
    """Value checks (host sync). ``ids`` (e.g. qids) name the offending sample in the message."""
    if v_feat_dim is not None and t_feat_dim is not None:
        check_input_shapes(video, video_mask, text, text_mask, v_feat_dim=v_feat_dim, t_feat_dim=t_feat_dim,
                           max_v_l=max_v_l)

    def who(b: int) -> str:
        return f"sample {b}" + (f" (id {ids[b]!r})" if ids is not None and b < len(ids) else "")

    for name, x, m in (("video", video, video_mask), ("text", text, text_mask)):
        if m.dtype != torch.bool:
            bad = ~((m == 0) | (m == 1))
            if bad.any():
                b = int(bad.any(1).nonzero()[0])
                raise InputError(f"{name}_mask of {who(b)} has values other than 0/1")
        mb = as_bool_mask(m)
        counts = mb.sum(1)
        empty = (counts == 0).nonzero()
        if len(empty):
            unit = "clip" if name == "video" else "token"
            raise InputError(f"{who(int(empty[0]))} has no valid {unit} ({name}_mask is all padding)")
        prefix = torch.arange(mb.shape[1], device=mb.device)[None, :] < counts[:, None]
        holes = (prefix != mb).any(1).nonzero()
        if len(holes):
            raise InputError(f"{name}_mask of {who(int(holes[0]))} is not a prefix (valid positions must come "
                             f"first, padding last)")
        finite = torch.isfinite(x).all(-1) | ~mb  # padding may hold anything
        nonfinite = (~finite).any(1).nonzero()
        if len(nonfinite):
            b = int(nonfinite[0])
            t = int((~finite[b]).nonzero()[0])
            raise InputError(f"{name} features of {who(b)} contain NaN/inf (first at position {t})")
