"""Prediction from a video file, and windowed prediction for videos of any length.

    python -m engine.predict --ckpt best.pt --video clip.mp4 --query "a man opens a door" [--query ...]
        [--queries FILE] [--clip CLIP_DIR] [--slowfast SLOWFAST_8x8_R50.pkl] [--out result.json] [--plot DIR]

    predictor = Predictor.from_checkpoint("best.pt")
    result = predictor.predict_video("clip.mp4", ["a man opens a door"], clip="clip-vit-base-patch32/",
                                     slowfast="SLOWFAST_8x8_R50.pkl")
    result["results"][0]["windows"]   # [[start_s, end_s, score], ...] best first
    result["results"][0]["saliency"]  # one score per clip

The checkpoint's feature contract decides which extractors run (``engine.extract.layout.extractors_for``;
a CLIP-only contract, v_feat_dim 514, needs no SlowFast) and a contract they cannot produce is an error
naming both. Video features are cached in ``CACHE/{key}/{feature dir}.npz`` where CACHE is ``cache_dir``,
else ``$LDDETR_FEATURE_CACHE``, else ``~/.cache/ld-detr/features``, and ``key`` hashes the file's content
(sha256) with every extractor's name, weights, dims, fps and the clip length. Videos longer than the
model's window are scored in overlapping windows (:mod:`engine.windows`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .features import DataError, read_array
from .windows import DEFAULT_NMS, default_window, merge_moments, merge_saliency, split_windows

if TYPE_CHECKING:
    from .predict import Predictor

__all__ = ["predict_windows", "predict_video", "cache_root", "add_video_args", "video_main"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LDDETR_FEATURE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ld-detr" / "features"


# --------------------------------------------------------------------------------------------- windows

def _n_clips(video: Mapping[str, Any] | np.ndarray, dirs: Sequence[str]) -> int:
    if isinstance(video, Mapping):
        return min(len(np.asarray(video[d])) for d in dirs if d in video) if any(d in video for d in dirs) else 0
    return len(np.asarray(video))


def _slice(video: Mapping[str, Any] | np.ndarray, s: int, e: int):
    if isinstance(video, Mapping):
        return {k: np.asarray(v)[s:e] for k, v in video.items()}
    return np.asarray(video)[s:e]


def predict_windows(predictor: "Predictor", video: Mapping[str, Any] | np.ndarray, query_tokens: Sequence[Any],
                    queries: Sequence[str] | None = None, duration: float | None = None, *,
                    window: int | None = None, stride: int | None = None, nms_thd: float = DEFAULT_NMS,
                    max_moments: int | None = None) -> list[dict]:
    """``Predictor.predict`` for any length: one pass when the video fits ``window`` clips (default: the
    model's ``max_v_l``, or 150 s of clips when uncapped), else overlapping windows merged
    (moments: temporal NMS on seconds; saliency: mean in the overlaps)."""
    spec = predictor.spec
    window = int(window or spec.max_video_len or default_window(spec.clip_length))
    if spec.max_video_len and window > spec.max_video_len:
        raise ValueError(f"window {window} clips exceeds the model's max_v_l {spec.max_video_len}")
    n = _n_clips(video, spec.video_dirs)
    ranges = split_windows(n, window, stride) if n > 0 else [(0, 0)]
    if len(ranges) == 1:
        return predictor._predict_once(video, query_tokens, queries=queries, duration=duration)
    clip = spec.clip_length
    total = float(duration) if duration is not None else n * clip
    per_window = []
    for s, e in ranges:
        dur = (min(total, e * clip) - s * clip) if e == n else (e - s) * clip
        per_window.append(predictor._predict_once(_slice(video, s, e), query_tokens, queries=queries, duration=dur))
    results = []
    for q in range(len(query_tokens)):
        rows = [w[q]["windows"] for w in per_window]
        keep = max_moments or len(rows[0])
        results.append({"query": per_window[0][q]["query"],
                        "windows": merge_moments(rows, [s * clip for s, _ in ranges], duration=total,
                                                 nms_thd=nms_thd, max_moments=keep),
                        "saliency": None if per_window[0][q]["saliency"] is None  # datasets without saliency
                        else merge_saliency(n, ranges, [w[q]["saliency"] for w in per_window])})
    return results


# --------------------------------------------------------------------------------------------- video

def _extractor_key(ex) -> dict:
    m = ex.manifest()
    for v in m.values():  # weights identity: path plus file size (a replaced file gets a new key)
        if isinstance(v, dict) and v.get("weights") and Path(str(v["weights"])).is_file():
            v["weights_size"] = Path(str(v["weights"])).stat().st_size
    return m


def _cache_key(path: Path, ex, kinds: Sequence[str]) -> str:
    from .extract.decode import FRAME_CHOICE_VERSION
    from .extract.pipeline import file_hash

    blob = json.dumps({"sha256": file_hash(path), "kinds": list(kinds), "extractors": _extractor_key(ex),
                       "frame_choice": FRAME_CHOICE_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def video_features(path: str | os.PathLike, ex, kinds: Sequence[str], cache_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> dict[str, np.ndarray]:
    """Raw features ``{feature dir: (T, D)}`` of one video, from the cache or extracted (then cached)."""
    from .extract.layout import VIDEO_KEY, write_array
    from .extract.pipeline import DIR_OF_KIND, extract_video

    path = Path(path)
    if not path.is_file():
        raise DataError(f"video {path}: no such file")
    folder = cache_root(cache_dir) / _cache_key(path, ex, kinds)
    files = {DIR_OF_KIND[k]: folder / f"{DIR_OF_KIND[k]}.npz" for k in kinds}
    if all(f.is_file() for f in files.values()):
        return {d: read_array(f, VIDEO_KEY) for d, f in files.items()}
    feats = extract_video(path, ex, progress=progress, kinds=kinds)
    for d, arr in feats.items():
        write_array(files[d], VIDEO_KEY, arr)
    return feats


def build_extractors(predictor: "Predictor", clip: str | os.PathLike | None, slowfast: str | os.PathLike | None,
                     slowfast_test_config: str | None = None):
    """The extractors the checkpoint's contract needs (cached on the predictor), dims checked against it."""
    from .extract.layout import extractors_for
    from .extract.pipeline import Extractors

    kinds = extractors_for(predictor.spec)
    key = (tuple(kinds), str(clip), str(slowfast), slowfast_test_config)
    cached = getattr(predictor, "_extractors", None)
    if cached is not None and cached[0] == key:
        return cached[1], kinds
    ex = Extractors.build(kinds, clip=clip, slowfast=slowfast, device=predictor.device,
                          clip_length=predictor.spec.clip_length, slowfast_test_config=slowfast_test_config)
    extractors_for(predictor.spec, dims=ex.dims, text_dim=ex.clip.text_dim)
    predictor._extractors = (key, ex)
    return ex, kinds


def predict_video(predictor: "Predictor", path: str | os.PathLike, queries: Sequence[str], *,
                  clip: str | os.PathLike | None = "openai/clip-vit-base-patch32",
                  slowfast: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                  window: int | None = None, stride: int | None = None, nms_thd: float = DEFAULT_NMS,
                  progress: bool = True, slowfast_test_config: str | None = None) -> dict:
    """A video file and query strings -> ``{"video", "n_clips", "clip_length", "results": [{query, windows,
    saliency}]}`` (windows in seconds, best first; one saliency score per clip)."""
    from .extract.pipeline import extract_queries

    if isinstance(queries, str):
        queries = [queries]
    if not queries:
        raise DataError("no queries given (--query TEXT or --queries FILE)")
    ex, kinds = build_extractors(predictor, clip, slowfast, slowfast_test_config)
    feats = video_features(path, ex, kinds, cache_dir=cache_dir, progress=progress)
    tokens = extract_queries(list(queries), ex)
    results = predictor.predict(feats, tokens, queries=list(queries), window=window, stride=stride, nms_thd=nms_thd)
    n = min(len(v) for v in feats.values())
    return {"video": str(path), "n_clips": n, "clip_length": predictor.spec.clip_length, "results": results}


# --------------------------------------------------------------------------------------------- CLI

def add_video_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prediction from a video file (--video)")
    g.add_argument("--video", type=Path, default=None, help="a video file (any container/codec PyAV reads)")
    g.add_argument("--query", action="append", default=[], help="a query (repeatable)")
    g.add_argument("--queries", type=Path, default=None, help="queries: a .jsonl with 'query' per line, or plain text")
    g.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP model folder or local HF name")
    g.add_argument("--slowfast", type=Path, default=None, help="SlowFast weights (SLOWFAST_8x8_R50.pkl)")
    g.add_argument("--slowfast-test-config", default=None, help=argparse.SUPPRESS)
    g.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default $LDDETR_FEATURE_CACHE "
                                                                   "or ~/.cache/ld-detr/features)")
    g.add_argument("--window", type=int, default=None, help="clips per window for long videos (default max_v_l)")
    g.add_argument("--stride", type=int, default=None, help="clips between window starts (default window / 2)")
    g.add_argument("--nms", type=float, default=DEFAULT_NMS, help="IoU for merging moments across windows")


def _read_query_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"no queries file {path}")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i + 1}: not JSON ({e.msg})") from None
            if not isinstance(row.get("query"), str):
                raise DataError(f"{path}:{i + 1}: expected a string 'query'")
            line = row["query"]
        out.append(line)
    return out


def video_main(args: argparse.Namespace, predictor: "Predictor") -> int:
    """``--video`` mode of ``python -m engine.predict`` (errors propagate to its one-line handler)."""
    from .atomic import save_json

    queries = list(args.query) + (_read_query_file(args.queries) if args.queries else [])
    result = predict_video(predictor, args.video, queries, clip=args.clip, slowfast=args.slowfast,
                           cache_dir=args.cache_dir, window=args.window, stride=args.stride, nms_thd=args.nms,
                           slowfast_test_config=args.slowfast_test_config)
    if args.out is not None:
        save_json(result, args.out, indent=2)
        print(f"wrote {len(result['results'])} predictions to {args.out}", file=sys.stderr)
    else:
        print(json.dumps(result, indent=2))
    if args.plot is not None:
        from .predict import plot_prediction

        args.plot.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(result["results"]):
            rec = {"qid": i, "query": r["query"], "pred_relevant_windows": r["windows"],
                   "pred_saliency_scores": r["saliency"]}
            plot_prediction(rec, None, result["clip_length"], args.plot / f"query{i}.png")
    return 0
