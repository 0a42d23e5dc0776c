"""A synthetic moment-retrieval dataset in the exact QVHighlights on-disk layout, with a learnable signal.

Layout written under ``root`` (the same as the Moment-DETR feature pack + annotation files)::

    train.jsonl, val.jsonl                  qid, query, duration, vid, relevant_clip_ids, saliency_scores,
                                            relevant_windows (QVHighlights key order; windows in seconds)
    slowfast_features/{vid}.npz             key "features", (T, slowfast_dim) float32
    clip_features/{vid}.npz                 key "features", (T, clip_dim) float32
    clip_text_features/qid{qid}.npz         keys "last_hidden_state" (N, text_dim), "pooler_output" (text_dim,)
    manifest.json                           generator version + parameters + counts; written LAST

Read it with ``feature_spec_for("synthetic", root)`` and ``MomentDataset(..., dataset="synthetic")`` (the
QVHighlights label rules); evaluate it with the QVHighlights metrics (2-s clips by default).

The signal (one query per video; videos of ``min_clips..max_clips`` clips of ``clip_length`` s):

* A bank of ``n_concepts`` unit "concept" vectors lives in a shared ``text_dim``-d space (the CLIP space).
  CLIP clip features are ``latent @ P_clip``, SlowFast features ``latent @ P_sf`` (fixed random projections;
  ``P_clip`` is the identity when ``clip_dim == text_dim``), so both video modalities carry the concepts.
* Each query draws a concept k. Clips inside its windows have latent ``s_t * c_k`` with
  ``s_t = 0.8 + 0.6 * (1 - d_t)`` (``d_t`` = distance to the window centre / half width, so the centre is
  strongest); clips outside are either plain background (latent 0) or belong to 2-6-clip distractor runs of
  other concepts at strength 0.25. Window boundaries are sharp: a clip is in or out.
* Every clip also gets a per-video "scene" vector (strength 0.5) and Gaussian noise (std 0.1 per channel,
  drawn separately for each modality); files are stored at a random overall scale (the loader normalises).
* Query tokens (4-16) are noisy copies of ``c_k`` (std 0.15), mixed with a few "function word" vectors
  shared by all queries; at least 2 tokens carry the concept. So text-clip similarity localises the windows.
* 1-3 windows per query (60/25/15 %), QVHighlights-like lengths: short 2-5 clips, middle 6-15, long 16+
  (single-window queries only); windows are sorted, disjoint and never adjacent, as in QVHighlights.
* ``saliency_scores``: 3 annotators, 0-4, ``round(1 + 3 * (1 - d_t) + N(0, 0.5))`` clipped, so highest
  near the window centre (where the concept is strongest).

Train and val use the same concept bank and projections with fresh videos (val item i is drawn from
``(seed, "val", i)``, so it does not depend on ``n_train``). Every file is written to a temporary name and
renamed; the manifest comes last, so a half-written cache has no manifest and :func:`ensure_synthetic_dataset`
regenerates it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

VERSION = 2
MANIFEST = "manifest.json"
VID_PREFIX = "syn"
#: n_train is a multiple of the usual batch sizes (16/32/64), so every training batch is full.
DEFAULTS: dict[str, Any] = dict(
    n_train=2048, n_val=300, seed=0, slowfast_dim=64, clip_dim=32, text_dim=32, clip_length=2.0,
    min_clips=16, max_clips=28, n_concepts=32,
)
_SPLITS = {"train": 0, "val": 1}
_QID_OFFSET = {"train": 0, "val": 1_000_000}
_N_FUNCTION_WORDS = 8
_NOISE = 0.1
_SCENE = 0.5
_DISTRACTOR = 0.25
_TOKEN_NOISE = 0.15


def _params(**kwargs: Any) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown synthetic dataset parameter(s) {unknown}; valid: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **kwargs}
    for k in ("n_train", "n_val", "seed", "slowfast_dim", "clip_dim", "text_dim", "min_clips", "max_clips", "n_concepts"):
        p[k] = int(p[k])
    p["clip_length"] = float(p["clip_length"])
    problems = []
    for k in ("n_train", "n_val", "slowfast_dim", "clip_dim", "text_dim"):
        if p[k] < 1:
            problems.append(f"{k} must be >= 1, got {p[k]}")
    if p["min_clips"] < 6:
        problems.append(f"min_clips must be >= 6 (room for windows and gaps), got {p['min_clips']}")
    if p["max_clips"] < p["min_clips"]:
        problems.append(f"max_clips ({p['max_clips']}) must be >= min_clips ({p['min_clips']})")
    if p["n_concepts"] < 2:
        problems.append(f"n_concepts must be >= 2 (distractors need another concept), got {p['n_concepts']}")
    if p["clip_length"] <= 0:
        problems.append(f"clip_length must be > 0, got {p['clip_length']}")
    if problems:
        raise ValueError("invalid synthetic dataset parameters: " + "; ".join(problems))
    return p


# ---------------------------------------------------------------------------------------------------------
# Atomic file writing
# ---------------------------------------------------------------------------------------------------------
def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------
def _projection(rng: np.random.Generator, d_in: int, d_out: int) -> np.ndarray:
    """(d_in, d_out) map that keeps concept geometry: identity, orthonormal rows, or a scaled Gaussian."""
    if d_in == d_out:
        return np.eye(d_in)
    if d_in < d_out:
        q, _ = np.linalg.qr(rng.standard_normal((d_out, d_in)))  # (d_out, d_in) orthonormal columns
        return q.T
    return rng.standard_normal((d_in, d_out)) / np.sqrt(d_out)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _window_lengths(rng: np.random.Generator, n_clips: int) -> list[int]:
    n_win = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    if n_win == 1:
        kind = rng.choice(["short", "middle", "long"], p=[0.3, 0.45, 0.25])
        if kind == "long" and n_clips >= 20:
            return [int(rng.integers(16, max(17, int(0.8 * n_clips)) + 1))]
        if kind in ("middle", "long") and n_clips >= 8:
            return [int(rng.integers(6, min(15, n_clips - 2) + 1))]
        return [int(rng.integers(2, 6))]
    lengths = [int(rng.integers(2, 6)) if rng.random() < 0.5 else int(rng.integers(6, 11)) for _ in range(n_win)]
    while sum(lengths) + n_win - 1 > n_clips - 2 and len(lengths) > 1:  # keep room for the gaps
        lengths.pop()
    lengths[0] = min(lengths[0], n_clips - 2)
    return lengths


def _place(rng: np.random.Generator, lengths: list[int], n_clips: int) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent [start, end) clip windows with the given lengths."""
    free = n_clips - sum(lengths) - (len(lengths) - 1)  # clips left after the mandatory 1-clip gaps
    cuts = np.sort(rng.integers(0, free + 1, size=len(lengths)))  # stars and bars
    gaps = np.diff(np.concatenate([[0], cuts]))
    out, pos = [], 0
    for i, (gap, length) in enumerate(zip(gaps, lengths)):
        pos += int(gap) + (1 if i else 0)
        out.append((pos, pos + length))
        pos += length
    return out


class _World:
    """The shared concept bank and projections of one seed."""

    def __init__(self, p: dict[str, Any]):
        rng = np.random.default_rng([p["seed"], 7919])
        d = p["text_dim"]
        self.concepts = _unit(rng, p["n_concepts"], d)  # (K, d)
        self.words = _unit(rng, _N_FUNCTION_WORDS, d)  # (W, d)
        self.p_clip = _projection(rng, d, p["clip_dim"])  # (d, clip_dim)
        self.p_sf = _projection(rng, d, p["slowfast_dim"])  # (d, slowfast_dim)


def _make_item(world: _World, p: dict[str, Any], split: str, i: int) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng([p["seed"], _SPLITS[split], i])
    n_clips = int(rng.integers(p["min_clips"], p["max_clips"] + 1))
    d, n_concepts = p["text_dim"], p["n_concepts"]
    k = int(rng.integers(n_concepts))
    windows = _place(rng, _window_lengths(rng, n_clips), n_clips)

    latent = np.zeros((n_clips, d))
    inside = np.zeros(n_clips, dtype=bool)
    closeness = np.zeros(n_clips)  # 1 - d_t inside windows
    for st, ed in windows:
        t = np.arange(st, ed)
        half = (ed - st) / 2.0
        closeness[st:ed] = 1.0 - np.abs(t + 0.5 - (st + half)) / half
        inside[st:ed] = True
    latent[inside] = (0.8 + 0.6 * closeness[inside])[:, None] * world.concepts[k]
    t = 0
    while t < n_clips:  # distractor runs in the outside stretches
        if inside[t]:
            t += 1
            continue
        run = int(rng.integers(2, 7))
        span = [u for u in range(t, min(t + run, n_clips)) if not inside[u]]
        if rng.random() < 0.5:
            j = int((k + 1 + rng.integers(n_concepts - 1)) % n_concepts)  # any concept but k
            latent[span] = _DISTRACTOR * world.concepts[j]
        t += run
    scene = _SCENE * _unit(rng, 1, d)[0]
    base = latent + scene  # (T, d)
    clip = base @ world.p_clip + _NOISE * rng.standard_normal((n_clips, p["clip_dim"]))
    slowfast = base @ world.p_sf + _NOISE * rng.standard_normal((n_clips, p["slowfast_dim"]))

    n_tok = int(rng.integers(4, 17))
    is_concept = rng.random(n_tok) < 0.65
    is_concept[rng.choice(n_tok, size=2, replace=False)] = True
    tokens = np.where(is_concept[:, None], world.concepts[k],
                      world.words[rng.integers(_N_FUNCTION_WORDS, size=n_tok)])
    tokens = tokens + _TOKEN_NOISE * rng.standard_normal((n_tok, d))

    rel_ids = np.flatnonzero(inside)
    sal = np.clip(np.round(1 + 3 * closeness[rel_ids][:, None] + 0.5 * rng.standard_normal((len(rel_ids), 3))), 0, 4)
    clip_len = p["clip_length"]
    duration = n_clips * clip_len
    duration_json: float | int = int(duration) if float(duration).is_integer() else round(duration, 6)
    vid = f"{VID_PREFIX}{split}{i:06d}_0.0_{float(duration)}"
    qid = _QID_OFFSET[split] + i
    record = {
        "qid": qid, "query": f"someone shows concept {k} in a {['short', 'long'][n_tok > 10]} scene",
        "duration": duration_json, "vid": vid, "relevant_clip_ids": rel_ids.tolist(),
        "saliency_scores": sal.astype(int).tolist(),
        "relevant_windows": [[_num(st * clip_len), _num(ed * clip_len)] for st, ed in windows],
    }
    scale = float(rng.uniform(2.0, 8.0))
    video = {"slowfast_features": (scale * slowfast).astype(np.float32),
             "clip_features": (scale * clip).astype(np.float32)}
    return record, video, (scale * tokens).astype(np.float32)


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(float(x), 6)


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def make_synthetic_dataset(root: str | os.PathLike, n_train: int = DEFAULTS["n_train"], n_val: int = DEFAULTS["n_val"],
                           seed: int = 0, slowfast_dim: int = DEFAULTS["slowfast_dim"],
                           clip_dim: int = DEFAULTS["clip_dim"], text_dim: int = DEFAULTS["text_dim"],
                           clip_length: float = 2.0, min_clips: int = DEFAULTS["min_clips"],
                           max_clips: int = DEFAULTS["max_clips"], n_concepts: int = DEFAULTS["n_concepts"],
                           progress: bool = False) -> dict[str, Any]:
    """(Re)write the synthetic dataset under ``root`` and return its manifest (see the module docstring).

    Refuses (``ValueError``) to write into a folder holding a non-synthetic ``train.jsonl`` without a manifest.
    """
    p = _params(n_train=n_train, n_val=n_val, seed=seed, slowfast_dim=slowfast_dim, clip_dim=clip_dim,
                text_dim=text_dim, clip_length=clip_length, min_clips=min_clips, max_clips=max_clips,
                n_concepts=n_concepts)
    root = Path(root)
    _guard_foreign(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # from here on the cache counts as half-written
    for sub in ("slowfast_features", "clip_features", "clip_text_features"):
        (root / sub).mkdir(exist_ok=True)
    world = _World(p)
    counts = {}
    for split, n in (("train", p["n_train"]), ("val", p["n_val"])):
        lines = []
        it = range(n)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"synthetic {split}", leave=False)
        for i in it:
            record, video, tokens = _make_item(world, p, split, i)
            for sub, arr in video.items():
                _write_npz(root / sub / f"{record['vid']}.npz", features=arr)
            _write_npz(root / "clip_text_features" / f"qid{record['qid']}.npz", last_hidden_state=tokens,
                       pooler_output=tokens.mean(0))
            lines.append(json.dumps(record))
        _write_text(root / f"{split}.jsonl", "\n".join(lines) + "\n")
        counts[split] = n
    manifest = {"generator": "engine.synthetic", "version": VERSION, "params": p, "counts": counts,
                "layout": {"video_dirs": ["slowfast_features", "clip_features"], "text_dir": "clip_text_features",
                           "text_pattern": "qid{qid}", "video_dims": [p["slowfast_dim"], p["clip_dim"]],
                           "text_dim": p["text_dim"], "clip_length": p["clip_length"]}}
    _write_text(root / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _guard_foreign(root: Path) -> None:
    train = root / "train.jsonl"
    if (root / MANIFEST).exists() or not train.is_file():
        return
    try:
        with open(train, encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        return  # unreadable: our own half-written file
    if first and not str(first.get("vid", "")).startswith(VID_PREFIX):
        raise ValueError(f"{root} holds a train.jsonl that is not synthetic (vid {first.get('vid')!r}); "
                         f"refusing to overwrite it")


def synthetic_is_ready(root: str | os.PathLike, **params: Any) -> bool:
    """True when ``root`` holds a complete dataset generated with exactly these parameters."""
    root = Path(root)
    m = _read_manifest(root)
    return (m is not None and m.get("version") == VERSION and m.get("params") == _params(**params)
            and (root / "train.jsonl").is_file() and (root / "val.jsonl").is_file())


def ensure_synthetic_dataset(root: str | os.PathLike, **params: Any) -> Path:
    """Generate the dataset under ``root`` unless a complete one with the same parameters is there already."""
    root = Path(root)
    if not synthetic_is_ready(root, **params):
        make_synthetic_dataset(root, **params)
    return root


__all__ = ["DEFAULTS", "VERSION", "make_synthetic_dataset", "ensure_synthetic_dataset", "synthetic_is_ready"]
