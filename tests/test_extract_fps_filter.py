"""engine.extract.decode's frame choice == ffmpeg's own ``fps`` filter (libavfilter through PyAV).

Each synthetic frame carries its index as 16 black/white blocks (robust to lossy coding), so the tests compare
WHICH source frames were chosen. The reference is what ``ffmpeg -i VIDEO -vf fps=R ... -f rawvideo pipe:``
(moment_detr's CLIP loader at R = 1/clip_length, HERO's SlowFast loader at R = 30) outputs:

* the CLI shifts every timestamp by ``-start_time`` of the file (the earliest stream start), then feeds the
  ``buffer -> fps=fps=R`` graph (defaults ``round=near``, ``eof_action=round``, no ``start_time``), closing it at
  the end of the last frame (pts + duration);
* the rawvideo muxer gets constant-rate sync (``-vsync cfr``), which fills the ticks before the fps filter's first
  output (a video stream starting after the file start) with that first frame.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")
import av.filter  # noqa: E402

from engine.extract.decode import Target, decode  # noqa: E402
from engine.extract.slowfast import FPS as SLOWFAST_FPS  # noqa: E402

SIDE, BLOCK, BITS = 32, 8, 16  # 4 x 4 blocks of 8 px: frame indices up to 65535
CLIP_LENGTHS = (2.0, 1.5)  # the default clip (moment_detr's fps=1/2) and a non-integer rate (2/3 fps)


def _frame_image(i: int) -> np.ndarray:
    img = np.zeros((SIDE, SIDE, 3), np.uint8)
    for b in range(BITS):
        y, x = divmod(b, SIDE // BLOCK)
        img[y * BLOCK:(y + 1) * BLOCK, x * BLOCK:(x + 1) * BLOCK] = 255 * ((i >> b) & 1)
    return img


def _frame_index(img: np.ndarray) -> int:
    g = img.astype(np.float64).mean(-1)
    n = SIDE // BLOCK
    means = g.reshape(n, BLOCK, n, BLOCK).mean((1, 3)).reshape(-1)
    return int(sum(1 << b for b in range(BITS) if means[b] > 127.5))


def _write(path, pts: list[int], time_base: Fraction, *, rate: Fraction | None = None, codec: str = "libx264",
           audio_from: float | None = None):
    """Frames i at ``pts[i] * time_base`` s showing index i (``rate``: the stream's nominal rate, default
    1 / time_base); ``audio_from``: a silent AAC track from that time."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate or 1 / time_base)
        s.width = s.height = SIDE
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = time_base
        a = c.add_stream("aac", rate=8000) if audio_from is not None else None
        for i, p in enumerate(pts):
            fr = av.VideoFrame.from_ndarray(_frame_image(i), format="rgb24")
            fr.pts, fr.time_base = p, time_base
            for pkt in s.encode(fr):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
        if a is not None:
            end = float((pts[-1] + 1) * time_base)
            for k in range(int(audio_from * 8000), int(end * 8000), 1024):
                af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = 8000, k, Fraction(1, 8000)
                for pkt in a.encode(af):
                    c.mux(pkt)
            for pkt in a.encode():
                c.mux(pkt)
    return path


def _cfr(path, rate: Fraction, n: int, **kw):
    return _write(path, list(range(n)), 1 / rate, **kw)


# name -> builder(tmp_path): constant rates, NTSC, variable rate, late starts (with and without audio)
VIDEOS = {
    "cfr24": lambda d: _cfr(d / "a.mp4", Fraction(24), 175),  # 7.29 s: exact ties at 24 -> 30 fps
    "cfr25": lambda d: _cfr(d / "b.mp4", Fraction(25), 131, codec="mpeg4"),  # 5.24 s
    "ntsc": lambda d: _cfr(d / "c.mp4", Fraction(30000, 1001), 200),  # 6.67 s
    "cfr30": lambda d: _cfr(d / "d.mkv", Fraction(30), 106),  # 3.53 s
    "cfr60": lambda d: _cfr(d / "e.mp4", Fraction(60), 250),  # 4.17 s
    # ms steps 20..400 plus ties of both rates (0.05 s = 1.5 ticks at 30 fps, 1 s and 3 s = half ticks at 1/2)
    "vfr": lambda d: _write(d / "f.mkv", sorted(set(np.cumsum(np.random.default_rng(0).integers(20, 400, 40))
                                                    .tolist()) | {0, 50, 1000, 3000}), Fraction(1, 1000),
                          rate=10),
    # a first pts of 0.71 s (21.3 ticks at 30 fps), alone in the file or after an audio track starting at 0
    "late_start": lambda d: _write(d / "g.mkv", [710 + 33 * i for i in range(120)], Fraction(1, 1000), rate=30),
    "late_video_with_audio": lambda d: _write(d / "h.mkv", [710 + 33 * i for i in range(120)], Fraction(1, 1000),
                                              rate=30, audio_from=0.0),
}


def _ffmpeg_choice(path, fps: float) -> list[int]:
    """Source-frame indices ``ffmpeg -i path -vf fps=fps -f rawvideo`` outputs (see the module docstring)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        tb = Fraction(s.time_base)
        start = Fraction(c.start_time or 0, 1_000_000) / tb  # >= 0 here; av_rescale_q rounds halves away
        shift = -int(start + Fraction(1, 2))
        g = av.filter.Graph()
        src = g.add_buffer(template=s)
        fps_filter = g.add("fps", fps=repr(float(fps)))  # as ffmpeg-python passes fps=0.5: a double to av_d2q
        sink = g.add("buffersink")
        src.link_to(fps_filter)
        fps_filter.link_to(sink)
        g.configure()
        out: dict[int, int] = {}

        def drain():
            while True:
                try:
                    f = sink.pull()
                except (av.BlockingIOError, av.EOFError):
                    return
                out[f.pts] = _frame_index(f.to_ndarray(format="rgb24"))

        for f in c.decode(s):
            f.pts += shift
            src.push(f)
            drain()
        src.push(None)
        drain()
    ticks = sorted(out)
    assert ticks == list(range(ticks[0], ticks[-1] + 1)) and ticks[0] >= 0
    return [out[ticks[0]]] * ticks[0] + [out[k] for k in ticks]  # -vsync cfr fills the ticks before the first


def _our_choice(path) -> dict[str, list[int]]:
    """Our frame choice through the extractor's own targets: one pass, CLIP rates and SlowFast's 30 fps."""
    targets = {f"clip{L}": Target(1.0 / L, chunk=3) for L in CLIP_LENGTHS}
    targets["slowfast"] = Target(float(SLOWFAST_FPS), chunk=60)
    got: dict[str, list[int]] = {name: [] for name in targets}
    for name, chunk in decode(path, targets):
        got[name] += [_frame_index(img) for img in chunk]
    return got


@pytest.mark.parametrize("name", list(VIDEOS))
def test_frame_choice_matches_ffmpeg_fps_filter(tmp_path, name):
    path = VIDEOS[name](tmp_path)
    with av.open(str(path)) as c:  # the pattern survives coding: decoded frame i shows index i
        shown = [_frame_index(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    assert shown == list(range(len(shown)))
    ours = _our_choice(path)
    for L in CLIP_LENGTHS:
        assert ours[f"clip{L}"] == _ffmpeg_choice(path, 1.0 / L), f"{name}: CLIP at 1/{L} fps"
    assert ours["slowfast"] == _ffmpeg_choice(path, SLOWFAST_FPS), f"{name}: SlowFast at 30 fps"
