"""Video decoding with PyAV: frames at a target rate, as ffmpeg's ``fps`` filter picks them.

The datasets' features were extracted from ``ffmpeg -i VIDEO -vf fps=R,scale=W:H`` pipes (moment_detr
``run_on_video/data_utils.py`` for CLIP at R = 1/2, HERO_Video_Feature_Extractor for SlowFast at R = 30).
This module reproduces that frame choice in one decoding pass for several rates at once (checked against
libavfilter's own ``fps`` filter in ``tests/test_extract_fps_filter.py``):

* timestamps are the decoded frames' ``pts``, taken relative to the file's start time (the earliest stream
  start, ``container.start_time``; ffmpeg's CLI shifts every packet by ``-start_time`` the same way, rounded to
  the stream's time base), and all rounding is done on exact rationals (``pts * time_base * R``), as
  libavfilter's integer ``av_rescale_q_rnd`` does: any container or codec PyAV reads, constant or variable frame
  rate alike, since only timestamps are used;
* output frame ``k`` (time ``k / R``) is the **last** decoded frame whose timestamp rounds onto tick ``k`` or
  before (``round(t * R) <= k``, halves away from zero, i.e. ``t < (k + 0.5) / R``), or the first frame when
  none does (ffmpeg ``fps`` with its defaults ``round=near`` and no ``start_time``; a video stream starting
  after the file start fills the ticks before it with its first frame, as the CLI's ``-vsync cfr`` does for
  the rawvideo pipe);
* the number of output frames is ``max(1, round(end * R))`` with ``end = t_last + last frame's duration``
  (ffmpeg's ``eof_action=round``; ffmpeg itself outputs 0 frames for a video shorter than half a period, we keep
  one): a trailing part shorter than half an output period is dropped, a longer one gives one more frame —
  "the last partial clip" as the datasets have it;
* rotation metadata (the display matrix PyAV exposes as ``frame.rotation``) is honoured like ffmpeg's
  autorotate: the picture is turned to its display orientation, and the output size is computed from the
  display (rotated) width and height;
* resizing (when a ``size`` function is given) is swscale bicubic on the decoded picture (what ffmpeg's
  ``scale`` filter runs), straight to RGB24.

Errors are :class:`VideoError`, one line naming the file: unreadable, no video stream, no decodable frame.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

__all__ = ["VideoError", "VideoInfo", "Target", "probe", "output_count", "pick_frames", "decode", "read_frames"]

SizeFn = Callable[[int, int], tuple[int, int]]  # (display H, W) -> output (H', W')


class VideoError(ValueError):
    """A video that cannot be used (the message is one line naming the file)."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream (width/height are display, i.e. rotated)."""

    path: str
    width: int
    height: int
    rotation: int  # degrees counter-clockwise applied to the coded picture (0, 90, 180, 270)
    fps: float  # the stream's average rate (0.0 when unknown)
    duration: float  # container/stream duration in seconds (0.0 when unknown; decoding gives the exact one)
    codec: str
    has_audio: bool


@dataclass(frozen=True)
class Target:
    """One output stream of :func:`decode`: frames at ``fps``, resized by ``size`` (None = native), in chunks."""

    fps: float
    size: SizeFn | None = None
    chunk: int = 60  # frames per yielded array


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("decoding video needs PyAV: pip install 'ld-detr[video]'") from None
    return av


def _open(path: str | os.PathLike):
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video {path}: no such file")
    try:
        container = av.open(str(path))
    except Exception as e:  # noqa: BLE001 - InvalidDataError, PermissionError, ...: one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise VideoError(f"video {path}: unreadable ({type(e).__name__}: {first})") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoError(f"video {path}: no video stream (streams: {', '.join(kinds)})")
    return container


def _stream_rotation(stream) -> int:
    """Rotation from the stream's display matrix / legacy ``rotate`` tag (0 when none)."""
    tag = stream.metadata.get("rotate") if stream.metadata else None
    if tag is not None:
        try:
            return (-int(float(tag))) % 360  # the tag is clockwise
        except ValueError:
            return 0
    return 0


def normalize_rotation(degrees: float) -> int:
    """A display-matrix angle (counter-clockwise, any sign) -> 0, 90, 180 or 270."""
    return int(round(float(degrees) / 90.0)) % 4 * 90


def rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    """(H, W, 3) -> the picture turned ``rotation`` degrees counter-clockwise (ffmpeg autorotate)."""
    k = normalize_rotation(rotation) // 90
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def probe(path: str | os.PathLike) -> VideoInfo:
    """Open ``path`` and describe its first video stream; raises :class:`VideoError` if unusable."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rot = _stream_rotation(stream)
        try:  # the display matrix travels with the decoded frames
            first = next(container.decode(stream), None)
        except Exception:  # noqa: BLE001 - decode() reports undecodable streams with its own message
            first = None
        if first is not None and first.rotation:
            rot = normalize_rotation(first.rotation)
        w, h = stream.codec_context.width, stream.codec_context.height
        if rot in (90, 270):
            w, h = h, w
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        else:
            duration = 0.0
        return VideoInfo(str(path), int(w), int(h), rot, fps, duration, stream.codec_context.name,
                         bool(container.streams.audio))
    finally:
        container.close()


# --------------------------------------------------------------------------------------------- frame choice

_INT_MAX = 2**31 - 1
# bumped whenever the frame choice changes, so cached features of the old choice are not reused
# (2: exact-rational rounding and timestamps from the file's start time, as ffmpeg's CLI)
FRAME_CHOICE_VERSION = 2


def _rate(fps: float | Fraction) -> Fraction:
    """The output rate as ffmpeg holds it: ``av_d2q(fps, INT_MAX)`` (0.5 -> 1/2, 2/3 s clips -> 3/2, 30 -> 30)."""
    return fps if isinstance(fps, Fraction) else Fraction(float(fps)).limit_denominator(_INT_MAX)


def _round_near(x: Fraction) -> int:
    """``AV_ROUND_NEAR_INF`` on an exact rational: to the nearest integer, halves away from zero."""
    return math.floor(x + Fraction(1, 2)) if x >= 0 else -math.floor(-x + Fraction(1, 2))


def _tick(t: float | Fraction, rate: Fraction) -> int:
    """The output tick ffmpeg's ``fps`` filter rounds a timestamp of ``t`` s onto (``round=near``)."""
    return _round_near(Fraction(t) * rate)


def output_count(duration: float | Fraction, fps: float | Fraction) -> int:
    """Frames ffmpeg's ``fps=R`` filter outputs for ``duration`` seconds: round half away, at least 1."""
    return max(1, _tick(duration, _rate(fps)))


def pick_frames(times: np.ndarray, fps: float | Fraction, duration: float | Fraction) -> np.ndarray:
    """Which decoded frame each output frame shows (ffmpeg ``fps`` filter, ``round=near``).

    times: (N,) seconds (floats or Fractions, taken exactly), non-decreasing, from the video's start. Returns
    (output_count,) int64 indices: the last ``i`` with ``round(times[i] * fps) <= k`` (i.e. ``times[i] <
    (k + 0.5) / fps``), 0 when there is none.
    """
    if np.ndim(times) != 1 or len(times) == 0:
        raise ValueError(f"pick_frames needs a non-empty 1-D array of times, got shape {np.shape(times)}")
    rate = _rate(fps)
    ticks = np.array([_tick(t, rate) for t in times], dtype=np.int64)
    n_out = output_count(duration, rate)
    return np.maximum(np.searchsorted(ticks, np.arange(n_out), side="right") - 1, 0).astype(np.int64)


class _Sampler:
    """Streaming form of :func:`pick_frames` for one :class:`Target`: push frames in order, get chunks."""

    def __init__(self, target: Target):
        if not target.fps > 0:
            raise ValueError(f"target fps must be > 0, got {target.fps}")
        self.t = target
        self.rate = _rate(target.fps)
        self.k = 0  # next output frame
        self.prev = None  # (frame, cached array or None)
        self.buf: list[np.ndarray] = []

    def _array(self, rot: int) -> np.ndarray:
        frame, arr = self.prev
        if arr is None:
            kw = {}
            if self.t.size is not None:
                w, h = frame.width, frame.height
                dh, dw = (w, h) if rot in (90, 270) else (h, w)  # display size
                oh, ow = self.t.size(dh, dw)
                ch, cw = (ow, oh) if rot in (90, 270) else (oh, ow)  # coded-orientation size
                kw = dict(width=int(cw), height=int(ch), interpolation="BICUBIC")
            arr = rotate(frame.to_ndarray(format="rgb24", **kw), rot)
            self.prev = (frame, arr)
        return arr

    def _emit_until(self, stop: int, rot: int) -> Iterator[np.ndarray]:
        while self.k < stop:
            self.buf.append(self._array(rot))
            self.k += 1
            if len(self.buf) >= self.t.chunk:
                yield self._flush()

    def push(self, frame, t: Fraction, rot: int) -> Iterator[np.ndarray]:
        """A decoded frame at exact time t: the outputs before its tick ``round(t * fps)`` show the previous one."""
        if self.prev is not None:
            yield from self._emit_until(_tick(t, self.rate), rot)
        self.prev = (frame, None)

    def finish(self, duration: Fraction, rot: int) -> Iterator[np.ndarray]:
        yield from self._emit_until(output_count(duration, self.rate), rot)
        if self.buf:
            yield self._flush()

    def _flush(self) -> np.ndarray:
        out = np.stack(self.buf)
        self.buf = []
        return out


def _start_offset(container, tb: Fraction) -> int | None:
    """``-start_time`` of the file in ``stream``'s time base, rounded as ffmpeg's CLI shifts every packet
    (``ts_offset = -ic->start_time``, ``av_rescale_q`` rounds to nearest); None when the file has no start time."""
    start = container.start_time  # AV_TIME_BASE (microseconds): the earliest start over all streams
    if start is None:
        return None
    return _round_near(Fraction(-int(start), 1_000_000) / tb)


def decode(path: str | os.PathLike, targets: Mapping[str, Target]) -> Iterator[tuple[str, np.ndarray]]:
    """One decoding pass -> ``(target name, (n, H, W, 3) uint8 RGB chunk)`` in time order per target.

    Every target gets exactly ``output_count(duration, fps)`` frames (see the module docstring)."""
    container = _open(path)
    samplers = {name: _Sampler(t) for name, t in targets.items()}
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tag_rot = _stream_rotation(stream)
        tb = Fraction(stream.time_base) if stream.time_base else None
        avg = Fraction(stream.average_rate) if stream.average_rate else Fraction(30)
        off = _start_offset(container, tb) if tb is not None else None
        last_t: Fraction | None = None
        last_dur = Fraction(0)
        n = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None or tb is None:
                    t = n / avg
                else:
                    if off is None:  # no file start time: the first frame's pts is the start
                        off = -frame.pts
                    t = (frame.pts + off) * tb
                if last_t is not None and t < last_t:  # broken timestamps: keep time monotone
                    t = last_t
                rot = normalize_rotation(frame.rotation) if frame.rotation else tag_rot
                if last_t is not None:
                    last_dur = t - last_t
                if frame.duration and tb is not None:
                    last_dur = frame.duration * tb
                last_t, n = t, n + 1
                for name, s in samplers.items():
                    for chunk in s.push(frame, t, rot):
                        yield name, chunk
        except Exception as e:  # noqa: BLE001 - a corrupt stream mid-file: one line
            if n == 0:
                raise VideoError(f"video {path}: undecodable ({type(e).__name__}: {str(e)[:200]})") from None
            raise VideoError(f"video {path}: decoding failed after {n} frames ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
        if n == 0:
            raise VideoError(f"video {path}: no decodable video frames (zero-length video)")
        if last_dur <= 0:
            last_dur = 1 / avg if stream.average_rate else Fraction(0)
        duration = last_t + last_dur
        for name, s in samplers.items():
            for chunk in s.finish(duration, rot):
                yield name, chunk
    finally:
        container.close()


def read_frames(path: str | os.PathLike, fps: float, size: SizeFn | None = None) -> np.ndarray:
    """All frames of ``path`` at ``fps`` as one (n, H, W, 3) uint8 array (small videos / tests)."""
    chunks = [c for _, c in decode(path, {"v": Target(fps, size, chunk=1 << 30)})]
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
