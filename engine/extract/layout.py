"""The on-disk layout ``engine.extract`` writes, and how a checkpoint's feature contract maps onto extractors.

Written once here, read by ``engine.features`` (whose :class:`FeatureSpec` defaults are the same layout)::

    ROOT/slowfast_features/{vid}.npz      key "features", (T, 2304) float32, raw (not normalised)
    ROOT/clip_features/{vid}.npz          key "features", (T, 512) float32, raw
    ROOT/clip_text_features/qid{qid}.npz  key "last_hidden_state", (L <= 32, 512) float32, raw
    ROOT/manifest.json                    extractors, weights, clip length, fps, dims, videos

The SlowFast || CLIP concatenation order and the normalisation are *not* decided here: they are the
checkpoint's feature contract (``FeatureSpec.video_dirs`` order, default ``["slowfast_features",
"clip_features"]``; per-row L2 normalisation and TEF in ``engine.features``). :func:`extractors_for`
checks a contract against what the extractors produce and names both on a mismatch.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_open
from ..features import DataError, FeatureSpec

__all__ = ["SLOWFAST_DIR", "CLIP_DIR", "TEXT_DIR", "VIDEO_KEY", "TEXT_KEY", "TEXT_PATTERN", "DTYPE",
           "video_file", "text_file", "write_array", "extractors_for", "describe_contract"]

SLOWFAST_DIR = "slowfast_features"
CLIP_DIR = "clip_features"
TEXT_DIR = "clip_text_features"
VIDEO_KEY = "features"
TEXT_KEY = "last_hidden_state"
TEXT_PATTERN = "qid{qid}"
DTYPE = np.float32
#: feature folder -> extractor kind; the folder order of a contract is its concatenation order
KIND_OF_DIR = {SLOWFAST_DIR: "slowfast", CLIP_DIR: "clip"}
SLOWFAST_CLIP_SECONDS = 2.0


def video_file(root: str | os.PathLike, vdir: str, vid: str) -> Path:
    return Path(root) / vdir / f"{vid}.npz"


def text_file(root: str | os.PathLike, qid: Any) -> Path:
    return Path(root) / TEXT_DIR / f"{TEXT_PATTERN.format(qid=qid)}.npz"


def write_array(path: str | os.PathLike, key: str, arr: np.ndarray) -> None:
    """``path`` (.npz) holding ``{key: arr as float32}``, atomically (a crash leaves no partial file)."""
    buf = io.BytesIO()
    np.savez(buf, **{key: np.ascontiguousarray(arr, dtype=DTYPE)})
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def describe_contract(spec: FeatureSpec) -> str:
    """One line: folders (in concatenation order) with dims, text folder/key/dim, clip length."""
    dims = spec.video_dims or ["?"] * len(spec.video_dirs)
    video = " || ".join(f"{d}[{n}]" for d, n in zip(spec.video_dirs, dims))
    return (f"video {video} ({spec.video_key!r}), text {spec.text_dir}/{spec.text_pattern}[{spec.text_dim}] "
            f"({spec.text_key!r}), clip_length {spec.clip_length:g} s")


def extractors_for(spec: FeatureSpec, dims: dict[str, int] | None = None, text_dim: int | None = None) -> list[str]:
    """The extractor kinds (``"slowfast"``, ``"clip"``) a contract needs, in its concatenation order.

    ``dims`` (kind -> feature dim) and ``text_dim`` check the dims when the extractors are built. Raises
    :class:`DataError` naming both the checkpoint's contract and what ``engine.extract`` writes."""
    problems = []
    unknown = [d for d in spec.video_dirs if d not in KIND_OF_DIR]
    if unknown:
        problems.append(f"feature folder(s) {unknown} have no extractor (engine.extract writes {list(KIND_OF_DIR)})")
    if spec.video_key != VIDEO_KEY:
        problems.append(f"video key {spec.video_key!r} (extracted: {VIDEO_KEY!r})")
    if spec.text_dir != TEXT_DIR or spec.text_key != TEXT_KEY:
        problems.append(f"text features {spec.text_dir}/{spec.text_key!r} (extracted: {TEXT_DIR}/{TEXT_KEY!r})")
    kinds = [KIND_OF_DIR.get(d, "?") for d in spec.video_dirs]
    if "slowfast" in kinds and not math.isclose(spec.clip_length, SLOWFAST_CLIP_SECONDS):
        problems.append(f"clip_length {spec.clip_length:g} s with SlowFast (SlowFast clips are "
                        f"{SLOWFAST_CLIP_SECONDS:g} s)")
    if dims is not None and spec.video_dims is not None:
        for d, want, kind in zip(spec.video_dirs, spec.video_dims, kinds):
            if kind in dims and dims[kind] != want:
                problems.append(f"{d} is {want}-d in the checkpoint, the {kind} extractor gives {dims[kind]}")
    if text_dim is not None and spec.text_dim is not None and spec.text_dim != text_dim:
        problems.append(f"text tokens are {spec.text_dim}-d in the checkpoint, CLIP gives {text_dim}")
    if problems:
        made = FeatureSpec(video_dirs=[SLOWFAST_DIR, CLIP_DIR], video_dims=[
            (dims or {}).get("slowfast", 2304), (dims or {}).get("clip", 512)], text_dim=text_dim or 512)
        raise DataError(f"the checkpoint's feature contract ({describe_contract(spec)}) cannot be produced from "
                        f"a video: {'; '.join(problems)}. engine.extract writes {describe_contract(made)} "
                        f"(or CLIP only)")
    return kinds
