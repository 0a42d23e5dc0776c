"""Videos -> feature files: one decoding pass per video feeding every extractor; corpus runs; queries.

    from engine.extract import Extractors, extract_video, extract_corpus
    ex = Extractors.build(["slowfast", "clip"], clip="path/to/clip-vit-base-patch32", slowfast="SLOWFAST_8x8_R50.pkl")
    feats = extract_video("clip.mp4", ex)     # {"slowfast_features": (T, 2304), "clip_features": (T', 512)}
    extract_corpus(["videos/"], "features/", ex, queries="queries.jsonl")

Corpus runs are resumable (each output is written atomically; a video whose files all exist is skipped)
and shard across ``torchrun`` ranks (rank r takes every W-th video of the sorted list, on device
``cuda:LOCAL_RANK`` when there is a GPU); rank 0 writes ``manifest.json`` after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..atomic import save_json
from ..features import DataError
from .decode import Target, VideoError, decode, probe
from .layout import (CLIP_DIR, KIND_OF_DIR, SLOWFAST_DIR, TEXT_KEY, VIDEO_KEY, text_file, video_file,
                     write_array)

__all__ = ["Extractors", "extract_video", "extract_queries", "extract_corpus", "list_videos", "file_hash",
           "VIDEO_EXTS"]

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp")
DIR_OF_KIND = {v: k for k, v in KIND_OF_DIR.items()}


@dataclass
class Extractors:
    """The extractors of one run, by kind ("slowfast", "clip"); ``clip`` also encodes the queries."""

    slowfast: Any = None
    clip: Any = None
    clip_length: float = 2.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, kinds: Sequence[str], *, clip: str | os.PathLike | None = None,
              slowfast: str | os.PathLike | None = None, device: str | torch.device | None = None,
              batch_size: int = 8, clip_length: float = 2.0, slowfast_test_config: str | None = None
              ) -> "Extractors":
        """Load the extractors a run needs (``kinds`` from ``layout.extractors_for`` or the CLI)."""
        bad = sorted(set(kinds) - set(DIR_OF_KIND))
        if bad:
            raise DataError(f"unknown extractor(s) {bad}; expected some of {sorted(DIR_OF_KIND)}")
        if not clip_length > 0:
            raise DataError(f"clip length must be > 0 s, got {clip_length}")
        ex = cls(clip_length=float(clip_length))
        if "slowfast" in kinds:
            from .slowfast import SlowFastExtractor

            if slowfast is None and slowfast_test_config is None:
                raise DataError("SlowFast features need weights: pass --slowfast PATH (PySlowFast's "
                                "SLOWFAST_8x8_R50.pkl)")
            ex.slowfast = SlowFastExtractor(weights=slowfast, device=device, batch_size=batch_size,
                                            test_config=slowfast_test_config)
        from .clip import CLIPExtractor  # CLIP is always built: it encodes the queries

        if clip is None:
            raise DataError("CLIP features need a model: pass --clip DIR_OR_NAME (openai/clip-vit-base-patch32)")
        ex.clip = CLIPExtractor(clip, device=device, batch_size=max(batch_size, 1) * 8)
        if "clip" not in kinds:
            ex.extra["video_clip"] = False
        return ex

    @property
    def kinds(self) -> list[str]:
        """Video extractors in the standard concatenation order (SlowFast, then CLIP)."""
        out = ["slowfast"] if self.slowfast is not None else []
        return out + (["clip"] if self.clip is not None and self.extra.get("video_clip", True) else [])

    @property
    def dirs(self) -> list[str]:
        return [DIR_OF_KIND[k] for k in self.kinds]

    @property
    def dims(self) -> dict[str, int]:
        return {k: getattr(self, k).dim for k in self.kinds}

    def manifest(self) -> dict:
        """Extractor names, weights, clip length, fps, dims: what produced the features (and the cache key)."""
        out: dict[str, Any] = {"clip_length": self.clip_length, "layout": {
            "video_key": VIDEO_KEY, "text_key": TEXT_KEY, "dtype": "float32", "normalised": False}}
        if self.slowfast is not None:
            out[SLOWFAST_DIR] = self.slowfast.manifest()
        if self.clip is not None:
            m = dict(self.clip.manifest(), fps=1.0 / self.clip_length)
            out[CLIP_DIR if "clip" in self.kinds else "clip_text"] = m
        return out


def extract_video(path: str | os.PathLike, ex: Extractors, progress: bool = True,
                  kinds: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """One video -> ``{feature dir: (T, D) float32}`` for every video extractor in ``ex`` (or only ``kinds``),
    in one decoding pass.

    CLIP: one frame per ``clip_length`` s (ffmpeg ``fps``); SlowFast: 30 fps frames, 60 per clip (the last
    partial clip padded as HERO does; ``source_fps`` = the stream's average rate, as HERO's ``info["fps"]``). Raises :class:`VideoError` (one line) for an unusable file."""
    info = probe(path)
    kinds = ex.kinds if kinds is None else list(kinds)
    targets: dict[str, Target] = {}
    if "slowfast" in kinds:
        sf = ex.slowfast
        targets["slowfast"] = Target(float(sf.fps), size=sf.scaled_size, chunk=sf.frames_per_clip * sf.batch_size)
    if "clip" in kinds:
        targets["clip"] = Target(1.0 / ex.clip_length, size=ex.clip.scaled_size, chunk=ex.clip.batch_size)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in targets}
    bar = None
    if progress:
        from tqdm import tqdm

        total = round(info.duration, 1) if info.duration > 0 else None
        bar = tqdm(total=total, unit="s", desc=Path(path).name[:40], leave=False, file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}]")
    try:
        for kind, frames in decode(path, targets):
            extractor = ex.slowfast if kind == "slowfast" else ex.clip
            if kind == "slowfast":  # HERO samples the fast window by floor(the source's average rate) / 30
                feats = extractor(torch.from_numpy(frames), source_fps=max(info.fps, 1.0) if info.fps > 0 else None)
            else:
                feats = extractor.image(frames)
            parts[kind].append(feats)
            if bar is not None and kind == next(iter(targets)):
                bar.update(min(len(frames) / targets[kind].fps, max(0.0, (bar.total or 1e18) - bar.n)))
    finally:
        if bar is not None:
            bar.close()
    return {DIR_OF_KIND[k]: torch.cat(v).numpy().astype(np.float32, copy=False) for k, v in parts.items()}


def extract_queries(queries: Sequence[str], ex: Extractors) -> list[np.ndarray]:
    """Query strings -> per query (L <= 32, 512) float32 CLIP token features."""
    return [t.numpy() for t in ex.clip.text(list(queries))]


# --------------------------------------------------------------------------------------------- corpus

def list_videos(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (their video files, recursively) and ``.txt`` lists (one path a line) -> sorted paths."""
    out: set[Path] = set()
    for src in sources:
        p = Path(src)
        if p.is_dir():
            out.update(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTS)
        elif p.suffix.lower() in (".txt", ".lst", ".list") and p.is_file():
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line) if Path(line).is_absolute() else p.parent / line
                    if not q.is_file():
                        raise DataError(f"{p}:{i + 1}: no video file {q}")
                    out.add(q)
        elif p.is_file():
            out.add(p)
        else:
            raise DataError(f"no such video, folder or list file: {p}")
    videos = sorted(out)
    stems: dict[str, Path] = {}
    for v in videos:
        if v.stem in stems:
            raise DataError(f"two videos share the vid {v.stem!r}: {stems[v.stem]} and {v}")
        stems[v.stem] = v
    return videos


def read_queries(path: str | os.PathLike) -> list[dict]:
    """A jsonl with ``qid`` and ``query`` per line (extra keys ignored); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no queries file {path}")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i + 1}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or "query" not in row or not isinstance(row["query"], str):
            raise DataError(f"{path}:{i + 1}: expected an object with a string 'query'")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no queries")
    return rows


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of the file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _missing(root: Path, vid: str, kinds: list[str]) -> list[str]:
    return [k for k in kinds if not video_file(root, DIR_OF_KIND[k], vid).is_file()]


def extract_corpus(sources: Iterable[str | os.PathLike], out: str | os.PathLike, ex: Extractors, *,
                   queries: str | os.PathLike | None = None, rank: int = 0, world: int = 1,
                   progress: bool = True, skip_bad: bool = False) -> dict:
    """Extract every video of ``sources`` (and the ``queries`` jsonl) into ``out``; returns a summary.

    Rank ``rank`` of ``world`` takes videos ``rank::world`` (queries likewise by line). Finished files are
    skipped; each file is written atomically. ``skip_bad``: log unusable videos and go on (else raise)."""
    root = Path(out)
    videos = list_videos(sources)
    mine = videos[rank::world]
    done = skipped = 0
    failed: list[str] = []
    for path in mine:
        vid = path.stem
        todo = _missing(root, vid, ex.kinds)
        if not todo:
            skipped += 1
            continue
        try:
            feats = extract_video(path, ex, progress=progress, kinds=todo)
        except VideoError as e:
            if not skip_bad:
                raise
            print(f"skipping: {e}", file=sys.stderr)
            failed.append(str(path))
            continue
        for d, arr in feats.items():  # each file atomic; a crash between them redoes only the missing file
            write_array(video_file(root, d, vid), VIDEO_KEY, arr)
        done += 1
    n_queries = 0
    if queries is not None:
        rows = read_queries(queries)
        for i, row in enumerate(rows):
            if "qid" not in row:
                raise DataError(f"{queries}:{i + 1}: missing 'qid'")
        todo = [r for r in rows[rank::world] if not text_file(root, r["qid"]).is_file()]
        for b0 in range(0, len(todo), 64):
            batch = todo[b0:b0 + 64]
            for row, tokens in zip(batch, extract_queries([r["query"] for r in batch], ex)):
                write_array(text_file(root, row["qid"]), TEXT_KEY, tokens)
        n_queries = len(rows)
    return {"videos": len(videos), "extracted": done, "skipped": skipped, "failed": failed,
            "queries": n_queries, "rank": rank, "world": world}


def write_manifest(root: str | os.PathLike, ex: Extractors, summary: dict, videos: list[Path]) -> Path:
    """``root/manifest.json``: the extractors' manifest plus the video list (written by rank 0)."""
    path = Path(root) / "manifest.json"
    dims = {DIR_OF_KIND[k]: v for k, v in ex.dims.items()}
    from .decode import FRAME_CHOICE_VERSION

    save_json({"format": "ld-detr-features", "version": 1, "frame_choice": FRAME_CHOICE_VERSION,
               "video_dirs": ex.dirs, "video_dims": dims,
               "text_dim": ex.clip.text_dim, "extractors": ex.manifest(),
               "videos": [p.stem for p in videos], "failed": summary.get("failed", [])}, path)
    return path
