"""engine.extract.decode: ffmpeg-fps frame choice (hand-computed), decoding, rotation, the three bad-file errors."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from extract_helpers import write_audio_only, write_video, write_zero_length

from engine.extract.decode import (Target, VideoError, decode, normalize_rotation, output_count,
                                   pick_frames, probe, read_frames, rotate)


@pytest.mark.parametrize("duration, fps, n", [(150.0, 0.5, 75), (3.0, 0.5, 2), (2.9, 0.5, 1), (0.2, 0.5, 1),
                                              (150.0, 30, 4500), (1.01, 30, 30), (1.02, 30, 31)])
def test_output_count_rounds_half_away(duration, fps, n):
    assert output_count(duration, fps) == n


def test_pick_frames_hand_computed():
    # 25 fps, 3 s: output k at 1/fps = 2 s shows the last frame before (k + 0.5) * 2 s = 1 s, 3 s
    times = np.arange(75) / 25
    assert pick_frames(times, 0.5, 3.0).tolist() == [24, 74]
    # variable rate: frames at 0, 0.3, 0.35, 1.6, 1.7; at 1 fps edges 0.5, 1.5 -> frames 2, 2 (a gap repeats)
    assert pick_frames(np.array([0, 0.3, 0.35, 1.6, 1.7]), 1.0, 1.8).tolist() == [2, 2]
    # at 4 fps edges .125 .375 .625 .875 1.125 1.375 1.625: the first frame fills in, then the last before each edge
    assert pick_frames(np.array([0, 0.3, 0.35, 1.6, 1.7]), 4.0, 1.8).tolist() == [0, 2, 2, 2, 2, 2, 3]
    # exact ties round half away, as ffmpeg's integer rescale does: 60 -> 30 fps, frame 2k + 1 at (k + 0.5) / 30
    # rounds onto output k + 1, so output k shows frame 2k (float edges get some of these wrong)
    assert pick_frames([Fraction(i, 60) for i in range(12)], 30, Fraction(12, 60)).tolist() == [0, 2, 4, 6, 8, 10]
    assert output_count(Fraction(50, 24), 30) == 63  # 62.5 output periods: the half rounds up
    # a first frame later than the first edge still fills output 0
    assert pick_frames(np.array([0.0]), 30, 1 / 30).tolist() == [0]


def _all_frames(path):
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [(f.pts * s.time_base, f.duration * s.time_base, f.to_ndarray(format="rgb24")) for f in c.decode(s)]
    t = np.array([float(x) for x, _, _ in frames])
    last = float(frames[-1][1]) or t[-1] - t[-2]  # the decoder's own last-frame duration, as decode() takes it
    return t - t[0], t[-1] - t[0] + last, np.stack([a for _, _, a in frames])


@pytest.mark.parametrize("kind", ["cfr_audio", "vfr"])
def test_decode_matches_pick_frames(tmp_path, kind):
    if kind == "cfr_audio":
        path = write_video(tmp_path / "a.mp4", 62, 25, 40, 30, audio=True)
    else:
        times = np.cumsum(np.r_[0, np.random.default_rng(0).uniform(0.02, 0.4, 40)]).tolist()
        path = write_video(tmp_path / "v.mkv", len(times), 10, 36, 20, times=times)
    t, dur, frames = _all_frames(path)
    for fps in (0.5, 3.0, 30.0):
        got = read_frames(path, fps)
        idx = pick_frames(t, fps, dur)
        assert got.shape == (len(idx), frames.shape[1], frames.shape[2], 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, frames[idx])


def test_decode_several_targets_one_pass_chunks_and_size(tmp_path):
    path = write_video(tmp_path / "a.mp4", 50, 24, 64, 48)
    out: dict[str, list] = {"a": [], "b": []}
    for name, chunk in decode(path, {"a": Target(30, size=lambda h, w: (24, 32), chunk=16), "b": Target(0.5)}):
        out[name].append(chunk)
    assert [len(c) for c in out["a"]] == [16, 16, 16, 15]  # 50 / 24 s -> round(62.5) = 63 frames at 30 fps
    assert out["a"][0].shape[1:] == (24, 32, 3) and out["b"][0].shape == (1, 48, 64, 3)
    np.testing.assert_array_equal(np.concatenate(out["b"]), read_frames(path, 0.5))


def test_rotation():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert [normalize_rotation(a) for a in (0, 90, -90, 180, -180, 270, 89.6)] == [0, 90, 270, 180, 180, 270, 90]
    r = rotate(img, 90)  # counter-clockwise: the top-right pixel goes to the top-left
    assert r.shape == (3, 2, 3) and (r[0, 0] == img[0, 2]).all()
    np.testing.assert_array_equal(rotate(img, 180), img[::-1, ::-1])
    assert rotate(img, 0) is img


def test_probe(tmp_path):
    info = probe(write_video(tmp_path / "a.mp4", 30, 15, 40, 30, audio=True))
    assert (info.width, info.height, info.fps, info.has_audio) == (40, 30, 15.0, True)


def _one_line(e: pytest.ExceptionInfo, path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_files_one_line(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoError) as e:
        read_frames(garbage, 1.0)
    assert "unreadable" in _one_line(e, garbage)
    audio = write_audio_only(tmp_path / "sound.m4a")
    with pytest.raises(VideoError) as e:
        read_frames(audio, 1.0)
    assert "no video stream (streams: audio)" in _one_line(e, audio)
    empty = write_zero_length(tmp_path / "empty.avi")
    with pytest.raises(VideoError) as e:
        read_frames(empty, 1.0)
    assert "zero-length" in _one_line(e, empty)
    with pytest.raises(VideoError) as e:
        probe(tmp_path / "missing.mp4")
    assert "no such file" in _one_line(e, tmp_path / "missing.mp4")


def test_rotated_video_is_turned_upright(tmp_path):
    import av

    path = write_video(tmp_path / "r.mp4", 20, 10, 32, 24, rotate=90)
    info = probe(path)
    assert (info.rotation, info.width, info.height) == (90, 24, 32)  # display size
    with av.open(str(path)) as c:
        coded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    got = read_frames(path, 1.0, size=lambda h, w: (h, w))  # display (32, 24): the coded 24 x 32, turned
    assert got.shape == (2, 32, 24, 3)
    np.testing.assert_array_equal(got[0], np.rot90(coded[4]))  # output 0 = the last frame before 0.5 s
    small = read_frames(path, 1.0, size=lambda h, w: (h // 2, w // 2))
    assert small.shape == (2, 16, 12, 3)
