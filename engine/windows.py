"""Videos of any length: overlapping windows of clips, merged back (pure functions, no model).

A video longer than the model's maximum number of clips (``max_v_l``; uncapped presets use
``default_window(clip_length)``: 150 s of clips) is scored window by window:

1. :func:`split_windows` covers clips ``[0, n)`` with windows of ``window`` clips every ``stride`` clips, the
   last one aligned to the end (so every window is full length and the tail is not a tiny window);
2. each window is predicted on its own (its own TEF, its own duration); its moments are shifted by the
   window's start in seconds;
3. :func:`merge_moments` pools the shifted moments of all windows, sorts them by score and keeps them
   greedily with temporal NMS on seconds (IoU > ``nms_thd`` with a kept moment -> dropped);
4. :func:`merge_saliency` stitches the per-clip saliency: the mean over the windows covering each clip.

A video that fits in one window is one window, and callers run the ordinary single pass for it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .postprocess import temporal_nms

__all__ = ["DEFAULT_WINDOW_SECONDS", "DEFAULT_NMS", "default_window", "default_stride", "split_windows", "merge_saliency", "merge_moments"]

DEFAULT_WINDOW_SECONDS = 150.0  # window length when the model has no cap (max_v_l <= 0): the QVHighlights span
DEFAULT_NMS = 0.7  # IoU above which a lower-scored moment from another window is dropped


def default_window(clip_length: float) -> int:
    """Clips per window for an uncapped model: 150 s worth (the post-processing clamps windows to 150 s)."""
    return max(1, int(DEFAULT_WINDOW_SECONDS / clip_length))


def default_stride(window: int) -> int:
    """Half a window (50 % overlap), at least 1 clip."""
    return max(1, window // 2)


def split_windows(n_clips: int, window: int, stride: int | None = None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` clip ranges covering ``[0, n_clips)``; one range when it fits in ``window``.

    Starts are ``0, stride, 2 * stride, ...`` while the window stays inside; the last window is
    ``[n_clips - window, n_clips)``. ``stride`` defaults to half a window and must be in ``[1, window]``."""
    stride = default_stride(window) if stride is None else stride
    for name, v in (("n_clips", n_clips), ("window", window), ("stride", stride)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if stride > window:
        raise ValueError(f"stride {stride} exceeds the window {window}: clips between windows would be skipped")
    if n_clips <= window:
        return [(0, int(n_clips))]
    starts = list(range(0, n_clips - window, stride)) + [n_clips - window]
    return [(int(s), int(s + window)) for s in starts]


def merge_saliency(n_clips: int, ranges: Sequence[tuple[int, int]], scores: Sequence[Sequence[float]]) -> list[float]:
    """Per-clip mean of the windows' saliency scores over the windows that cover the clip.

    ranges[i] = (start, end) clips of window i, scores[i] its (end - start) scores."""
    total = np.zeros(n_clips, dtype=np.float64)
    count = np.zeros(n_clips, dtype=np.int64)
    for (s, e), sc in zip(ranges, scores):
        sc = np.asarray(sc, dtype=np.float64)
        if sc.shape != (e - s,):
            raise ValueError(f"window [{s}, {e}) has {sc.shape[0] if sc.ndim else 0} saliency scores, expected {e - s}")
        total[s:e] += sc
        count[s:e] += 1
    if (count == 0).any():
        raise ValueError(f"clip {int(np.argmin(count))} is covered by no window")
    return [round(float(x), 4) for x in total / count]


def merge_moments(rows_per_window: Sequence[Sequence[Sequence[float]]], offsets: Sequence[float], *,
                  duration: float | None = None, nms_thd: float = DEFAULT_NMS, max_moments: int = 10) -> list[list[float]]:
    """Moments ``[st, ed, score]`` of each window (seconds within the window) -> merged, best first.

    Each row is shifted by its window's offset (seconds), clamped to ``[0, duration]`` when given, then all
    rows are sorted by score (stable) and kept greedily unless their IoU with a kept one exceeds ``nms_thd``
    (``nms_thd <= 0``: no suppression); at most ``max_moments`` rows."""
    pooled = []
    for rows, off in zip(rows_per_window, offsets):
        for st, ed, sc in rows:
            st, ed = st + off, ed + off
            if duration is not None:
                st, ed = min(max(st, 0.0), duration), min(max(ed, 0.0), duration)
            pooled.append([round(float(st), 4), round(float(ed), 4), float(sc)])
    pooled.sort(key=lambda r: -r[2])
    if nms_thd > 0:
        return temporal_nms(pooled, nms_thd, max_moments)
    return pooled[:max_moments]
