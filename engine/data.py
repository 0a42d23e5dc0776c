"""Datasets, feature reading, labels and batching (spec ``ld-detr-code.md`` §6, ``evaluation.md`` §1, §4, §5).

On-disk layout (the Moment-DETR / QD-DETR / CG-DETR feature packs)::

    ROOT/slowfast_features/{vid}.npz     key "features", (T, 2304)     .npy accepted as a fallback
    ROOT/clip_features/{vid}.npz         key "features", (T, 512)
    ROOT/clip_text_features/qid{qid}.npz key "last_hidden_state", (N, 512)   TACoS: {qid}.npz
    ROOT/pann_features/{vid}.npy         optional audio, (T, 2048)
    TVSum: ROOT/video_features/{vid}_rgb.npy + {vid}_opt.npy (concatenated, 2048), query_features/{qid}.npz "token"

Reading (exactly as the official loader): each video modality is truncated to ``max_v_l``, cast to float32 and
L2-normalised per row (``x / (||x|| + 1e-5)``); modalities are cut to the shortest and concatenated in order;
the temporal endpoint feature ``[t/T, (t+1)/T]`` is appended last (not normalised). Text tokens are truncated
to ``max_q_l`` and L2-normalised per token.

Labels (``load_labels=True``): ``span_labels`` = windows / (T * clip_len), xx -> cxw; saliency by rule:
QVHighlights "all labels" (summed annotator scores), Charades/TACoS "sub as query" (binary GT clips), TVSum
(mean over annotators). Random picks use a ``numpy.random.Generator`` seeded by (seed, epoch, index).

Departures from the official loader (all harmless for well-formed data):

* windows are clamped to [0, 1] in (start, end) form before the cxw conversion (a window cut off by
  ``max_v_l`` keeps its visible part; one entirely past the cut is dropped);
* QVHighlights ``saliency_all_labels`` always has T entries: scores of clip ids >= T (cut off by ``max_v_l``)
  are dropped instead of growing the array by one slot, and the random positive is clamped to T-1 like the
  hard ones; ties for the hard pos/neg are broken by a stable sort (the later clip id wins the max, the
  earlier the min, as numpy's argsort does on short arrays);
* bad data raises :class:`DataError` naming the file and the key / qid instead of failing later.

CLI::

    python -m engine.data check --dataset qvhighlights --root FEATURES [--ann FILE ...]
    python -m engine.data synth --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from reference.span_utils import span_xx_to_cxw

#: canonical dataset names; "synthetic" is the QVHighlights format written by :mod:`engine.synthetic`.
DATASETS = ("qvhighlights", "charades", "tacos", "tvsum", "synthetic")
_ALIASES = {"hl": "qvhighlights", "qvhl": "qvhighlights", "qvhighlight": "qvhighlights",
            "charadessta": "charades", "charades_sta": "charades"}
#: saliency-label rule per dataset (spec §6 "Labels per sample").
LABEL_RULES = {"qvhighlights": "all", "synthetic": "all", "charades": "sub_as_query", "tacos": "sub_as_query",
               "tvsum": "tvsum"}
NORM_EPS = 1e-5  # added to the L2 norm (official ``l2_normalize_np_array``)
N_PAIRS = 2  # saliency pos / neg indices per sample
_FEATURE_EXTS = (".npz", ".npy")


class DataError(ValueError):
    """Unusable data (missing / corrupt file, wrong dims, bad annotation); the message names file and key/qid."""


def canonical_dataset(name: str) -> str:
    """``"hl"`` -> ``"qvhighlights"`` etc.; unknown names raise ``DataError`` listing the valid ones."""
    key = str(name).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    return key


def _few(items: Sequence[Any], n: int = 5) -> str:
    items = list(items)
    return repr(items[:n])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > n else "]")


# ---------------------------------------------------------------------------------------------------------
# Feature contract
# ---------------------------------------------------------------------------------------------------------
@dataclass
class FeatureSpec:
    """What the features on disk look like and how they are read (the "feature contract").

    ``video_parts`` maps a video dir to the file stems concatenated into that modality (default
    ``["{vid}"]``; TVSum: ``["{vid}_rgb", "{vid}_opt"]``). ``video_dims`` / ``text_dim`` / ``audio_dim`` are the
    per-modality channel counts (None = unknown: :meth:`resolve` reads them from the files).
    """

    video_dirs: list[str] = field(default_factory=lambda: ["slowfast_features", "clip_features"])
    text_dir: str = "clip_text_features"
    text_key: str = "last_hidden_state"
    text_pattern: str = "qid{qid}"
    video_key: str = "features"
    video_parts: dict[str, list[str]] = field(default_factory=dict)
    audio_dir: str | None = None
    video_dims: list[int] | None = None
    text_dim: int | None = None
    audio_dim: int | None = None
    use_tef: bool = True
    normalize_video: bool = True
    normalize_text: bool = True
    clip_length: float = 2.0
    max_v_l: int = 75  # <= 0: no cap
    max_q_l: int = 32

    def __post_init__(self) -> None:
        self.video_dirs = list(self.video_dirs)
        self.video_parts = {k: list(v) for k, v in self.video_parts.items()}
        if self.video_dims is not None:
            self.video_dims = [int(d) for d in self.video_dims]
        problems = []
        if not self.video_dirs:
            problems.append("video_dirs must not be empty")
        if self.video_dims is not None and len(self.video_dims) != len(self.video_dirs):
            problems.append(f"video_dims {self.video_dims} must give one dim per video dir {self.video_dirs}")
        if self.clip_length <= 0:
            problems.append(f"clip_length must be > 0, got {self.clip_length}")
        if self.max_q_l < 1:
            problems.append(f"max_q_l must be >= 1, got {self.max_q_l}")
        if "{qid}" not in self.text_pattern:
            problems.append(f"text_pattern must contain '{{qid}}', got {self.text_pattern!r}")
        unknown = sorted(set(self.video_parts) - set(self.video_dirs))
        if unknown:
            problems.append(f"video_parts names dirs {unknown} that are not in video_dirs {self.video_dirs}")
        if problems:
            raise ValueError("invalid FeatureSpec: " + "; ".join(problems))

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown FeatureSpec field(s) {unknown}; valid: {sorted(fields)}")
        return cls(**d)

    # ---- derived numbers --------------------------------------------------------------------------------
    @property
    def max_video_len(self) -> int | None:
        return self.max_v_l if self.max_v_l > 0 else None

    @property
    def v_feat_dim(self) -> int:
        """Model video input dim: sum of the modality dims (+2 TEF channels when ``use_tef``)."""
        if self.video_dims is None:
            raise DataError(f"video feature dims of {self.video_dirs} are unknown; pass video_dims or call "
                            f"spec.resolve(root) to read them from the files")
        return sum(self.video_dims) + (2 if self.use_tef else 0)

    @property
    def t_feat_dim(self) -> int:
        if self.text_dim is None:
            raise DataError(f"text feature dim of {self.text_dir}/ is unknown; pass text_dim or call spec.resolve(root)")
        return self.text_dim

    @property
    def a_feat_dim(self) -> int | None:
        """Audio input dim (+2 TEF like the official audio loader), or None without audio."""
        if self.audio_dir is None:
            return None
        if self.audio_dim is None:
            raise DataError(f"audio feature dim of {self.audio_dir}/ is unknown; pass audio_dim or call spec.resolve(root)")
        return self.audio_dim + (2 if self.use_tef else 0)

    def parts(self, vdir: str) -> list[str]:
        return self.video_parts.get(vdir, ["{vid}"])

    def check_config(self, cfg: Any) -> None:
        """Raise ``DataError`` (a ValueError) when a model config does not fit these features."""
        problems = []
        for name, ours in (("v_feat_dim", self.v_feat_dim), ("t_feat_dim", self.t_feat_dim)):
            if getattr(cfg, name) != ours:
                problems.append(f"{name}: features give {ours}, config has {getattr(cfg, name)}")
        if not math.isclose(float(cfg.clip_length), float(self.clip_length)):
            problems.append(f"clip_length: features are {self.clip_length} s per clip, config has {cfg.clip_length}")
        cap_cfg = cfg.max_v_l if cfg.max_v_l > 0 else None
        if cap_cfg != self.max_video_len:
            problems.append(f"max_v_l: features are read with {self.max_v_l}, config has {cfg.max_v_l}")
        if problems:
            detail = f" (video dims {self.video_dims}{' + 2 TEF' if self.use_tef else ''})" if self.video_dims else ""
            raise DataError("feature contract and model config disagree: " + "; ".join(problems) + detail)

    def resolve(self, root: str | os.PathLike) -> "FeatureSpec":
        """A copy with every unknown dim read from the first file found in its folder (left None if none)."""
        root = Path(root)
        new = dataclasses.replace(self, video_parts={k: list(v) for k, v in self.video_parts.items()})
        if new.video_dims is None:
            dims = [_discover_video_dim(root, d, self.parts(d), self.video_key) for d in self.video_dirs]
            new.video_dims = None if any(d is None for d in dims) else dims
        if new.text_dim is None:
            new.text_dim = _discover_dim(root / self.text_dir, "*", self.text_key)
        if new.audio_dir is not None and new.audio_dim is None:
            new.audio_dim = _discover_dim(root / new.audio_dir, "*", self.video_key)
        return new


#: standard per-dataset contracts (spec §1.2, §6; evaluation.md §5) and their usual dims.
_STANDARD: dict[str, dict[str, Any]] = {
    "qvhighlights": dict(clip_length=2.0, max_v_l=75, video_dims=[2304, 512], text_dim=512),
    "charades": dict(clip_length=1.0, max_v_l=-1, video_dims=[2304, 512], text_dim=512),
    "tacos": dict(clip_length=2.0, max_v_l=-1, text_pattern="{qid}", video_dims=[2304, 512], text_dim=512),
    "tvsum": dict(video_dirs=["video_features"], video_parts={"video_features": ["{vid}_rgb", "{vid}_opt"]},
                  text_dir="query_features", text_pattern="{qid}", text_key="token", clip_length=2.0, max_v_l=75,
                  video_dims=[2048], text_dim=512),
    "synthetic": dict(clip_length=2.0, max_v_l=75, video_dims=[64, 32], text_dim=32),
}


def feature_spec_for(dataset: str, root: str | os.PathLike | None = None, **overrides: Any) -> FeatureSpec:
    """The standard feature contract of ``dataset`` (qvhighlights | charades | tacos | tvsum | synthetic).

    Without ``root`` the usual dims are filled in (SlowFast 2304 + CLIP 512, text 512; TVSum I3D 2048). With
    ``root`` the dims are read from the files there (falling back to the usual ones for an empty folder), and
    for the synthetic set the clip length is taken from its manifest. ``overrides`` set any field, e.g.
    ``audio_dir="pann_features"``.
    """
    name = canonical_dataset(dataset)
    base = dict(_STANDARD[name])
    standard_dims = {k: base.pop(k) for k in ("video_dims", "text_dim")}
    if name == "synthetic" and root is not None:
        manifest = Path(root) / "manifest.json"
        if manifest.is_file():
            try:
                params = json.loads(manifest.read_text())["params"]
                base["clip_length"] = float(params["clip_length"])
                base["max_v_l"] = max(75, int(params["max_clips"]))
            except (ValueError, KeyError, TypeError):
                pass  # a broken manifest means a half-written cache; ensure_synthetic_dataset regenerates it
    base.update(overrides)
    spec = FeatureSpec(**base)
    if root is not None:
        spec = spec.resolve(root)
    if spec.video_dims is None and "video_dirs" not in overrides:
        spec.video_dims = list(standard_dims["video_dims"])
    if spec.text_dim is None and "text_dir" not in overrides:
        spec.text_dim = standard_dims["text_dim"]
    return spec


# ---------------------------------------------------------------------------------------------------------
# Low-level file reading
# ---------------------------------------------------------------------------------------------------------
def _candidates(folder: Path, stem: str) -> list[Path]:
    return [folder / f"{stem}{ext}" for ext in _FEATURE_EXTS]


def find_feature_file(folder: Path, stem: str, what: str) -> Path:
    """``folder/stem.npz``, else ``folder/stem.npy``; ``DataError`` listing both paths when neither exists."""
    tried = _candidates(folder, stem)
    for p in tried:
        if p.is_file():
            return p
    raise DataError(f"{what} not found: tried {', '.join(str(p) for p in tried)}")


def read_array(path: Path, key: str) -> np.ndarray:
    """The array under ``key`` of an ``.npz`` (or a plain ``.npy``); errors name the file and the key."""
    try:
        obj = np.load(path, allow_pickle=False)
    except Exception as e:  # BadZipFile, ValueError, OSError, EOFError, ...
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, np.ndarray):
        return obj
    with obj:
        if key not in obj.files:
            raise DataError(f"{path} has no key {key!r} (keys: {sorted(obj.files)})")
        try:
            return obj[key]
        except Exception as e:
            raise DataError(f"cannot read key {key!r} of {path}: {type(e).__name__}: {e}") from e


def read_array_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of the array ``read_array`` would return, from the .npy header only (no data read)."""
    try:
        if path.suffix == ".npy" and not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                return _npy_header_shape(f)
        with zipfile.ZipFile(path) as zf:
            name = f"{key}.npy"
            if name not in zf.namelist():
                keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
                raise DataError(f"{path} has no key {key!r} (keys: {keys})")
            with zf.open(name) as f:
                return _npy_header_shape(f)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _npy_header_shape(f) -> tuple[int, ...]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, _ = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, _ = np.lib.format.read_array_header_2_0(f)
    else:
        shape, _, _ = np.lib.format._read_array_header(f, version)  # (3, 0): utf-8 field names
    return tuple(int(s) for s in shape)


def _as_2d(arr: np.ndarray, path: Any, what: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] == 1:  # stray leading batch dim (the official audio loader drops it too)
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} must be a 2-D (length, channels) array, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: {what} has length 0")
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{path}: {what} has non-numeric dtype {arr.dtype}")
    return arr


def _check_finite(arr: np.ndarray, path: Any, what: str) -> None:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=-1).sum())
        raise DataError(f"{path}: {what} has NaN/inf values in {bad} of {arr.shape[0]} rows")


_DISCOVERY_TRIES = 20  # unreadable files skipped while discovering dims (the check CLI reports them)


def _discover_dim(folder: Path, glob: str, key: str) -> int | None:
    if not folder.is_dir():
        return None
    paths = sorted(p for p in folder.glob(glob) if p.suffix in _FEATURE_EXTS)
    for path in paths[:_DISCOVERY_TRIES]:
        try:
            return int(read_array_shape(path, key)[-1])
        except DataError:
            continue
    return None


def _discover_video_dim(root: Path, vdir: str, parts: list[str], key: str) -> int | None:
    folder = root / vdir
    if len(parts) == 1:
        return _discover_dim(folder, parts[0].replace("{vid}", "*"), key)
    prefix, _, suffix = parts[0].partition("{vid}")
    if not folder.is_dir():
        return None
    for path in sorted(p for p in folder.glob(f"{prefix}*{suffix}.*") if p.suffix in _FEATURE_EXTS):
        vid = path.stem[len(prefix): len(path.stem) - len(suffix)]
        try:
            files = [find_feature_file(folder, p.format(vid=vid), "") for p in parts]
            return sum(int(read_array_shape(f, key)[-1]) for f in files)
        except DataError:
            continue
    return None


# ---------------------------------------------------------------------------------------------------------
# Feature assembly (spec §6 "Features")
# ---------------------------------------------------------------------------------------------------------
def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise ``x / (||x||_2 + 1e-5)`` (official ``l2_normalize_np_array``)."""
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + NORM_EPS)


def temporal_endpoint_features(length: int) -> np.ndarray:
    """(T, 2) float32 ``[t/T, (t+1)/T]`` for t = 0..T-1 (TEF, spec §6)."""
    st = np.arange(length, dtype=np.float32) / length
    return np.stack([st, st + 1.0 / length], axis=1).astype(np.float32)


def _assemble_modality(arrays: list[np.ndarray], where: str, cap: int | None, normalize: bool,
                       expected: int | None, what: str) -> np.ndarray:
    """Truncate to ``cap``, cut parts to the shortest, concatenate channels, check the dim, L2-normalise."""
    arrays = [_as_2d(a, where, what)[:cap].astype(np.float32) for a in arrays]
    for a in arrays:
        _check_finite(a, where, what)
    length = min(a.shape[0] for a in arrays)
    feat = np.concatenate([a[:length] for a in arrays], axis=1) if len(arrays) > 1 else arrays[0]
    if expected is not None and feat.shape[1] != expected:
        got = " + ".join(str(a.shape[1]) for a in arrays)
        raise DataError(f"{where}: {what} has {got} channels, expected {expected}")
    return l2_normalize(feat) if normalize else feat


def _read_modality(folder: Path, stems: list[str], key: str, cap: int | None, normalize: bool, expected: int | None,
                   what: str) -> np.ndarray:
    paths = [find_feature_file(folder, stem, what) for stem in stems]
    arrays = [read_array(path, key) for path in paths]
    return _assemble_modality(arrays, ", ".join(map(str, paths)), cap, normalize, expected, what)


def _join_video(feats: list[np.ndarray], spec: FeatureSpec) -> np.ndarray:
    length = min(f.shape[0] for f in feats)
    video = np.concatenate([f[:length] for f in feats], axis=1)
    if spec.use_tef:
        video = np.concatenate([video, temporal_endpoint_features(length)], axis=1)
    return video.astype(np.float32, copy=False)


def read_video_features(root: str | os.PathLike, vid: str, spec: FeatureSpec) -> np.ndarray:
    """(T, sum(video_dims) [+2]) float32: every modality read, normalised, cut to the shortest, concatenated, + TEF."""
    root = Path(root)
    feats = []
    for i, vdir in enumerate(spec.video_dirs):
        stems = [p.format(vid=vid) for p in spec.parts(vdir)]
        expected = spec.video_dims[i] if spec.video_dims is not None else None
        feats.append(_read_modality(root / vdir, stems, spec.video_key, spec.max_video_len, spec.normalize_video,
                                    expected, f"video features ({vdir}) of vid {vid!r}"))
    return _join_video(feats, spec)


def prepare_video(video: Any, spec: FeatureSpec, name: str = "video") -> np.ndarray:
    """Raw in-memory video features -> the model input, exactly as :func:`read_video_features` builds it.

    ``video`` is ``{video_dir: (T, D) array}`` (one entry per ``spec.video_dirs``; TVSum-style multi-part
    folders take the parts already concatenated), or a single (T, D) array when the spec has one video dir.
    """
    if not isinstance(video, Mapping):
        if len(spec.video_dirs) != 1:
            raise DataError(f"{name}: pass a dict with one array per video feature folder {spec.video_dirs}")
        video = {spec.video_dirs[0]: video}
    missing = [d for d in spec.video_dirs if d not in video]
    if missing:
        raise DataError(f"{name}: missing video feature(s) {missing}; expected keys {spec.video_dirs}, got {sorted(video)}")
    feats = []
    for i, vdir in enumerate(spec.video_dirs):
        expected = spec.video_dims[i] if spec.video_dims is not None else None
        feats.append(_assemble_modality([np.asarray(video[vdir])], name, spec.max_video_len, spec.normalize_video,
                                        expected, f"video feature {vdir!r}"))
    return _join_video(feats, spec)


def prepare_text(tokens: Any, spec: FeatureSpec, name: str = "query") -> np.ndarray:
    """Raw in-memory (N, Dt) token features -> the model input (truncated to max_q_l, normalised per token)."""
    return _assemble_modality([np.asarray(tokens)], name, spec.max_q_l, spec.normalize_text, spec.text_dim, "text features")


def read_audio_features(root: str | os.PathLike, vid: str, spec: FeatureSpec) -> np.ndarray:
    """(T, audio_dim) float32 normalised audio (no TEF; :class:`MomentDataset` cuts it to the video and adds TEF)."""
    if spec.audio_dir is None:
        raise DataError("this FeatureSpec has no audio_dir")
    return _read_modality(Path(root) / spec.audio_dir, [vid], spec.video_key, spec.max_video_len,
                          spec.normalize_video, spec.audio_dim, f"audio features ({spec.audio_dir}) of vid {vid!r}")


def read_text_features(root: str | os.PathLike, qid: Any, spec: FeatureSpec) -> np.ndarray:
    """(N <= max_q_l, text_dim) float32 per-token features, L2-normalised per token."""
    folder = Path(root) / spec.text_dir
    stem = spec.text_pattern.format(qid=qid)
    what = f"text features of qid {qid!r} (key {spec.text_key!r})"
    path = find_feature_file(folder, stem, what)
    arr = _as_2d(read_array(path, spec.text_key), path, what)[: spec.max_q_l].astype(np.float32)
    _check_finite(arr, path, what)
    if spec.text_dim is not None and arr.shape[1] != spec.text_dim:
        raise DataError(f"{path}: {what} has {arr.shape[1]} channels, expected {spec.text_dim}")
    return l2_normalize(arr) if spec.normalize_text else arr


# ---------------------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------------------
class Annotations(list):
    """A list of annotation dicts that remembers the file it came from (``.path``, for error messages)."""

    def __init__(self, records=(), path: str | os.PathLike | None = None):
        super().__init__(records)
        self.path = None if path is None else Path(path)


def load_annotations(path: str | os.PathLike) -> Annotations:
    """Read a jsonl annotation file; ``DataError`` for a missing file, a malformed line, duplicate qids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    records = Annotations(path=path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in ("qid", "vid"):
                if key not in rec:
                    raise DataError(f"{path}:{lineno}: record has no {key!r} key (keys: {sorted(rec)})")
            records.append(rec)
    check_unique_qids(records, path)
    return records


def check_unique_qids(records: Sequence[dict], source: Any = None) -> None:
    seen, dups = set(), []
    for rec in records:
        q = rec["qid"]
        if q in seen and q not in dups:
            dups.append(q)
        seen.add(q)
    if dups:
        raise DataError(f"{source or 'annotations'}: {len(dups)} duplicate qid(s): {_few(dups)}")


def _windows(rec: dict) -> np.ndarray:
    value = rec.get("relevant_windows")
    if value is None:
        return np.zeros((0, 2))
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1, 2) if len(value) else np.zeros((0, 2))
    except (ValueError, TypeError):
        raise DataError(f"qid {rec['qid']!r}: relevant_windows must be [[start, end], ...], got {str(value)[:80]}") from None
    return arr


def window_problems(rec: dict) -> list[str]:
    """Descriptions of empty / out-of-range windows of one record ([] when all are fine)."""
    out = []
    duration = float(rec["duration"])
    for st, ed in _windows(rec):
        if not (np.isfinite(st) and np.isfinite(ed)) or ed <= st:
            out.append(f"empty window [{st:g}, {ed:g}]")
        elif st < 0 or ed > duration * (1 + 1e-6) + 1e-6:
            out.append(f"window [{st:g}, {ed:g}] outside [0, duration={duration:g}]")
    return out


def validate_record(rec: dict, rule: str, load_labels: bool, source: Any = None) -> None:
    """Check one annotation record; ``DataError`` naming the file and qid."""
    where = f"{source}: qid {rec['qid']!r}" if source else f"qid {rec['qid']!r}"
    try:
        duration = float(rec["duration"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{where}: needs a numeric 'duration', got {rec.get('duration')!r}") from None
    if not duration > 0:
        raise DataError(f"{where}: duration must be > 0, got {duration}")
    if not load_labels:
        return
    if rule == "tvsum":
        try:
            label = np.asarray(rec["label"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: TVSum labels need a 'label' list of per-clip annotator scores") from None
        if label.ndim != 2 or label.shape[0] == 0 or not np.isfinite(label).all():
            raise DataError(f"{where}: 'label' must be a non-empty (clips, annotators) array, got shape {label.shape}")
        return
    windows = _windows(rec)
    if len(windows) == 0:
        raise DataError(f"{where}: no relevant_windows (an unlabelled split? use load_labels=False)")
    problems = window_problems(rec)
    if problems:
        raise DataError(f"{where}: {problems[0]} (duration {duration:g})")
    if rule == "all":
        ids, scores = rec.get("relevant_clip_ids"), rec.get("saliency_scores")
        if not ids or scores is None:
            raise DataError(f"{where}: QVHighlights labels need non-empty 'relevant_clip_ids' and 'saliency_scores'")
        try:
            sc = np.asarray(scores, dtype=np.float64)
            ids_arr = np.asarray(ids, dtype=np.int64)
        except (TypeError, ValueError):
            raise DataError(f"{where}: 'relevant_clip_ids'/'saliency_scores' are not numeric") from None
        if sc.ndim != 2 or sc.shape[0] != len(ids_arr):
            raise DataError(f"{where}: need one saliency_scores row per relevant clip id "
                            f"({len(ids_arr)} ids, scores shape {sc.shape})")
        if ids_arr.min() < 0:
            raise DataError(f"{where}: negative relevant_clip_ids {_few(ids_arr[ids_arr < 0].tolist())}")


# ---------------------------------------------------------------------------------------------------------
# Labels (spec §6 "Labels per sample")
# ---------------------------------------------------------------------------------------------------------
def span_labels_from_windows(windows: np.ndarray, ctx_l: int, clip_length: float, max_windows: int,
                             rng: np.random.Generator) -> torch.Tensor:
    """(n <= max_windows, 2) float32 normalised cxw: windows / (ctx_l * clip_len), clamped to [0, 1], xx -> cxw."""
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    if len(windows) > max_windows:
        windows = windows[rng.permutation(len(windows))[:max_windows]]
    xx = np.clip(windows / (ctx_l * clip_length), 0.0, 1.0)
    xx = xx[xx[:, 1] > xx[:, 0]]  # a window entirely past a max_v_l cut has nothing left
    return span_xx_to_cxw(torch.as_tensor(xx, dtype=torch.float32).reshape(-1, 2))


def saliency_labels_all(rel_clip_ids: Sequence[int], scores: Any, ctx_l: int, rng: np.random.Generator
                        ) -> tuple[list[int], list[int], np.ndarray]:
    """QVHighlights rule: pos = [highest summed score, random relevant], neg = [lowest, random irrelevant].

    ``saliency_all_labels`` (ctx_l,) = the summed annotator scores at the relevant clips, 0 elsewhere. When
    every clip is relevant the random pair copies the hard pair.
    """
    ids = np.asarray(rel_clip_ids, dtype=np.int64)
    agg = np.asarray(scores, dtype=np.float64).reshape(len(ids), -1).sum(1)  # (n_rel,)
    order = np.argsort(agg, kind="stable")  # increasing
    all_labels = np.zeros(ctx_l, dtype=np.float32)
    inside = ids < ctx_l
    all_labels[ids[inside]] = agg[inside]
    hard_pos = [int(min(ids[order[-1]], ctx_l - 1))]
    hard_neg = [int(min(ids[order[0]], ctx_l - 1))]
    easy_neg_pool = sorted(set(range(ctx_l)) - set(ids.tolist()))
    if easy_neg_pool:
        easy_pos = [int(min(rng.choice(ids), ctx_l - 1))]
        easy_neg = [int(rng.choice(easy_neg_pool))]
    else:
        easy_pos, easy_neg = hard_pos, hard_neg
    return hard_pos + easy_pos, hard_neg + easy_neg, all_labels


def saliency_labels_sub_as_query(window: Sequence[float], duration: float, ctx_l: int, rng: np.random.Generator
                                 ) -> tuple[list[int], list[int], np.ndarray]:
    """Charades / TACoS rule: 2 distinct random positives in the GT clips, 2 random negatives outside."""
    clip_len = duration / ctx_l
    gt_st = int(window[0] / clip_len)
    gt_ed = max(0, min(int(window[1] / clip_len), ctx_l) - 1)
    gt_st = min(gt_st, gt_ed)
    if gt_st != gt_ed:
        pos = [int(x) for x in rng.choice(np.arange(gt_st, gt_ed + 1), size=N_PAIRS, replace=False)]
    else:
        pos = [gt_st] * N_PAIRS
    neg_pool = np.concatenate([np.arange(0, gt_st), np.arange(gt_ed + 1, ctx_l)])
    if len(neg_pool) >= N_PAIRS:
        neg = [int(x) for x in rng.choice(neg_pool, size=N_PAIRS, replace=False)]
    else:
        neg = list(pos)
    all_labels = np.zeros(ctx_l, dtype=np.float32)
    all_labels[gt_st: gt_ed + 1] = 1.0
    return pos, neg, all_labels


def saliency_labels_tvsum(label: Any, ctx_l: int) -> tuple[list[int], list[int], np.ndarray]:
    """TVSum: per-clip mean over annotators; pos = the 2 highest clips, neg = the 2 lowest (stable ties)."""
    mean = np.asarray(label, dtype=np.float64).mean(axis=1)[:ctx_l]
    all_labels = np.zeros(ctx_l, dtype=np.float32)
    all_labels[: len(mean)] = mean
    order = np.argsort(mean, kind="stable")
    top = [int(order[-1]), int(order[-2] if len(order) > 1 else order[-1])]
    bottom = [int(order[0]), int(order[1] if len(order) > 1 else order[0])]
    return top, bottom, all_labels


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------
class MomentDataset(Dataset):
    """One item per annotation record: features read from ``root`` by ``spec``, labels by dataset rule.

    ``__getitem__`` returns a dict: ``qid, vid, query, duration`` (python values), ``video`` (T, Dv) float32,
    ``text`` (N, Dt) float32, [``audio`` (T, Da+2)], and with ``load_labels``: ``span_labels`` (n, 2) cxw,
    ``saliency_pos_labels`` / ``saliency_neg_labels`` (2,) long, ``saliency_all_labels`` (T,) float32.
    Random picks come from ``numpy.random.default_rng([seed, epoch, index])``; :meth:`set_epoch` changes them
    (the epoch lives in shared memory, so persistent DataLoader workers see it). ``cache=True`` keeps the
    processed features in memory (per worker process): for small datasets such as the synthetic one.
    """

    def __init__(self, annotations: Sequence[dict] | str | os.PathLike, root: str | os.PathLike, spec: FeatureSpec,
                 dataset: str = "qvhighlights", load_labels: bool = True, max_windows: int = 5, seed: int = 0,
                 cache: bool = False):
        if isinstance(annotations, (str, os.PathLike)):
            annotations = load_annotations(annotations)
        self.source = getattr(annotations, "path", None)
        self.records = list(annotations)
        self.root = Path(root)
        self.spec = spec
        self.dataset = canonical_dataset(dataset)
        self.rule = LABEL_RULES[self.dataset]
        self.load_labels = load_labels
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        self.max_windows = max_windows
        self.seed = int(seed)
        self.cache = cache
        self._video_cache: dict[str, np.ndarray] = {}
        self._text_cache: dict[Any, np.ndarray] = {}
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        for rec in self.records:
            for key in ("qid", "vid"):
                if key not in rec:
                    raise DataError(f"{self.source or 'annotations'}: record without {key!r}: {str(rec)[:80]}")
        check_unique_qids(self.records, self.source)
        for rec in self.records:
            validate_record(rec, self.rule, load_labels, self.source)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        qid, vid = rec["qid"], str(rec["vid"])
        video = self._video_cache.get(vid) if self.cache else None
        if video is None:
            video = read_video_features(self.root, vid, self.spec)
            if self.cache:
                self._video_cache[vid] = video
        item: dict[str, Any] = {"qid": qid, "vid": vid, "query": rec.get("query", ""),
                                "duration": float(rec["duration"])}
        if self.spec.audio_dir is not None:
            audio = read_audio_features(self.root, vid, self.spec)
            length = min(len(video), len(audio))
            video = video[:length].copy()
            if self.spec.use_tef:
                video[:, -2:] = temporal_endpoint_features(length)  # TEF of the common length
                audio = np.concatenate([audio[:length], temporal_endpoint_features(length)], axis=1)
            item["audio"] = torch.from_numpy(np.ascontiguousarray(audio[:length]))
        item["video"] = torch.from_numpy(np.array(video) if self.cache else video)  # never hand out the cache
        text = self._text_cache.get(qid) if self.cache else None
        if text is None:
            text = read_text_features(self.root, qid, self.spec)
            if self.cache:
                self._text_cache[qid] = text
        item["text"] = torch.from_numpy(np.array(text) if self.cache else text)
        if self.load_labels:
            item.update(self.labels(index, len(video)))
        return item

    def labels(self, index: int, ctx_l: int) -> dict[str, torch.Tensor]:
        """The label tensors of record ``index`` for a video of ``ctx_l`` clips."""
        rec, rng = self.records[index], self.rng(index)
        if self.rule == "tvsum":
            spans = torch.zeros(0, 2)
            pos, neg, all_labels = saliency_labels_tvsum(rec["label"], ctx_l)
        else:
            windows = _windows(rec)
            spans = span_labels_from_windows(windows, ctx_l, self.spec.clip_length, self.max_windows, rng)
            if self.rule == "all":
                pos, neg, all_labels = saliency_labels_all(rec["relevant_clip_ids"], rec["saliency_scores"], ctx_l, rng)
            else:
                pos, neg, all_labels = saliency_labels_sub_as_query(windows[0], float(rec["duration"]), ctx_l, rng)
        return {"span_labels": spans, "saliency_pos_labels": torch.tensor(pos, dtype=torch.long),
                "saliency_neg_labels": torch.tensor(neg, dtype=torch.long),
                "saliency_all_labels": torch.from_numpy(all_labels)}


# ---------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------
def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (L_i, ...) tensors to (B, L_max, ...) and return it with a (B, L_max) bool mask."""
    lengths = torch.tensor([s.shape[0] for s in seqs])
    out = seqs[0].new_zeros((len(seqs), int(lengths.max())) + tuple(seqs[0].shape[1:]))
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    mask = torch.arange(out.shape[1])[None] < lengths[:, None]  # (B, L)
    return out, mask


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`MomentDataset` items.

    Returns ``video`` (B, T, Dv) zero-padded, ``video_mask`` (B, T) bool (True = valid), ``text`` (B, N, Dt),
    ``text_mask`` (B, N) bool, [``audio`` (B, T, Da)], ``meta`` (list of {qid, vid, query, duration}) and, when
    the items carry labels, ``targets`` = {``span_labels``: list of B (n_b, 2) cxw tensors,
    ``saliency_pos_labels`` / ``saliency_neg_labels``: (B, 2) long, ``saliency_all_labels``: (B, T) float}.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    batch: dict[str, Any] = {}
    batch["video"], batch["video_mask"] = _pad([it["video"] for it in items])
    batch["text"], batch["text_mask"] = _pad([it["text"] for it in items])
    if "audio" in items[0]:
        batch["audio"], _ = _pad([it["audio"] for it in items])
    labelled = ["span_labels" in it for it in items]
    if any(labelled):
        if not all(labelled):
            raise ValueError("collate: some items have labels and some do not")
        for it in items:
            if it["saliency_all_labels"].shape[0] != it["video"].shape[0]:
                raise ValueError(f"collate: qid {it['qid']!r} has {it['saliency_all_labels'].shape[0]} saliency "
                                 f"labels for {it['video'].shape[0]} clips")
        sal, _ = _pad([it["saliency_all_labels"] for it in items])  # (B, T), zero-padded
        batch["targets"] = {
            "span_labels": [it["span_labels"] for it in items],
            "saliency_pos_labels": torch.stack([it["saliency_pos_labels"] for it in items]),
            "saliency_neg_labels": torch.stack([it["saliency_neg_labels"] for it in items]),
            "saliency_all_labels": sal,
        }
    batch["meta"] = [{k: it[k] for k in ("qid", "vid", "query", "duration")} for it in items]
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from (seed, epoch): resumable and identical across runs.

    ``set_epoch(e)`` fixes the epoch; without it each pass moves on to the next epoch by itself.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        self.epoch += 1
        return iter(order)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0, seed: int = 0,
                device: str | torch.device | None = None, distributed: bool = False,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader with :func:`collate`, a seeded order, pinned memory only for CUDA, persistent workers.

    ``distributed=True`` shards with a ``DistributedSampler`` (call ``loader.sampler.set_epoch(e)``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = EpochShuffleSampler(len(dataset), seed) if shuffle else None
    generator = torch.Generator().manual_seed(int(seed))
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin, drop_last=drop_last, generator=generator,
                      persistent_workers=num_workers > 0, worker_init_fn=_worker_init if num_workers > 0 else None)


# ---------------------------------------------------------------------------------------------------------
# Dataset check
# ---------------------------------------------------------------------------------------------------------
CHECK_CATEGORIES = {
    "missing_video": "missing video feature files",
    "missing_text": "missing text feature files",
    "missing_audio": "missing audio feature files",
    "unreadable": "unreadable / corrupt feature files",
    "dim_mismatch": "feature dim mismatches",
    "duration_mismatch": "duration vs clip count inconsistencies",
    "bad_window": "windows empty or outside the duration",
}


class _Report:
    def __init__(self, max_examples: int):
        self.max_examples = max_examples
        self.problems = {k: {"count": 0, "examples": []} for k in CHECK_CATEGORIES}

    def add(self, category: str, example: dict) -> None:
        entry = self.problems[category]
        entry["count"] += 1
        if len(entry["examples"]) < self.max_examples:
            entry["examples"].append(example)


def _probe(folder: Path, stem: str, key: str, expected: int | None, what: str, report: _Report,
           missing: str) -> tuple[int, int] | None:
    """(length, dim) of one feature file from its header, recording any problem; None when unusable."""
    tried = _candidates(folder, stem)
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        report.add(missing, {"what": what, "tried": [str(p) for p in tried]})
        return None
    try:
        shape = read_array_shape(path, key)
    except DataError as e:
        report.add("unreadable", {"file": str(path), "error": str(e)})
        return None
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        report.add("dim_mismatch", {"file": str(path), "expected": "(length, channels)", "got": list(shape)})
        return None
    if expected is not None and shape[1] != expected:
        report.add("dim_mismatch", {"file": str(path), "expected": expected, "got": shape[1]})
    return shape[0], shape[1]


def check_dataset(dataset_name: str, root: str | os.PathLike, annotation_files: Sequence[str | os.PathLike],
                  spec: FeatureSpec | None = None, max_examples: int = 5, progress: bool = True) -> dict[str, Any]:
    """Scan annotations + features; return counts and first examples of every problem (nothing is loaded
    beyond the .npy headers).

    Raises ``DataError`` when the input is unusable (unknown dataset, missing root, unreadable annotations).
    """
    dataset = canonical_dataset(dataset_name)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"feature root {root} is not a folder")
    if not annotation_files:
        raise DataError(f"no annotation files given and no *.jsonl in {root}")
    spec = spec or feature_spec_for(dataset, root)
    rule = LABEL_RULES[dataset]
    report = _Report(max_examples)
    files, by_vid, n_queries = [], {}, 0
    qid_records = []
    for f in annotation_files:
        records = load_annotations(f)
        files.append({"file": str(f), "queries": len(records)})
        for rec in records:
            validate_record(rec, rule, load_labels=False, source=f)
            by_vid.setdefault(str(rec["vid"]), []).append(rec)
            qid_records.append(rec)
            for msg in window_problems(rec):
                report.add("bad_window", {"file": str(f), "qid": rec["qid"], "problem": msg})
        n_queries += len(records)
    truncated = 0
    cap = spec.max_video_len
    for vid, recs in tqdm(by_vid.items(), desc="videos", disable=not progress, leave=False):
        lengths = []
        for i, vdir in enumerate(spec.video_dirs):
            parts = spec.parts(vdir)
            expected = spec.video_dims[i] if spec.video_dims is not None and len(parts) == 1 else None
            probes = [_probe(root / vdir, p.format(vid=vid), spec.video_key, expected,
                             f"vid {vid!r} ({vdir})", report, "missing_video") for p in parts]
            if all(probes):
                if len(parts) > 1 and spec.video_dims is not None and sum(p[1] for p in probes) != spec.video_dims[i]:
                    report.add("dim_mismatch", {"vid": vid, "dir": vdir, "expected": spec.video_dims[i],
                                                "got": sum(p[1] for p in probes)})
                lengths.append(min(p[0] for p in probes))
        if spec.audio_dir is not None:
            probe = _probe(root / spec.audio_dir, vid, spec.video_key, spec.audio_dim, f"vid {vid!r} (audio)",
                           report, "missing_audio")
            if probe:
                lengths.append(probe[0])
        if len(lengths) != len(spec.video_dirs) + (spec.audio_dir is not None):
            continue
        t_raw = min(lengths)
        if cap is not None and t_raw > cap:
            truncated += 1
        for rec in recs:
            duration = float(rec["duration"])
            if rule == "tvsum" and rec.get("label") is not None:
                n_rows = len(rec["label"])
                if abs(n_rows - t_raw) > 1:
                    report.add("duration_mismatch", {"qid": rec["qid"], "vid": vid, "label_rows": n_rows,
                                                     "clips": t_raw})
                continue
            if abs(duration - t_raw * spec.clip_length) > spec.clip_length:
                ex = {"qid": rec["qid"], "vid": vid, "duration": duration, "clips": t_raw,
                      "clips_x_clip_length": t_raw * spec.clip_length}
                if cap is not None and t_raw > cap:
                    ex["note"] = f"also truncated to max_v_l={cap} clips = {cap * spec.clip_length:g} s"
                report.add("duration_mismatch", ex)
    for rec in tqdm(qid_records, desc="queries", disable=not progress, leave=False):
        stem = spec.text_pattern.format(qid=rec["qid"])
        _probe(root / spec.text_dir, stem, spec.text_key, spec.text_dim, f"qid {rec['qid']!r}", report,
               "missing_text")
    n_problems = sum(p["count"] for p in report.problems.values())
    return {"dataset": dataset, "root": str(root), "files": files, "queries": n_queries, "videos": len(by_vid),
            "spec": spec.to_dict(), "videos_truncated_by_max_v_l": truncated, "problems": report.problems,
            "n_problems": n_problems, "clean": n_problems == 0}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"dataset {report['dataset']} at {report['root']}: {report['queries']} queries, "
             f"{report['videos']} videos in {len(report['files'])} file(s)"]
    spec = report["spec"]
    lines.append(f"contract: video {spec['video_dirs']} dims {spec['video_dims']}, text {spec['text_dir']}/"
                 f"{spec['text_pattern']} dim {spec['text_dim']}, clip_length {spec['clip_length']}, "
                 f"max_v_l {spec['max_v_l']}")
    if report["videos_truncated_by_max_v_l"]:
        lines.append(f"note: {report['videos_truncated_by_max_v_l']} videos are longer than max_v_l and get truncated")
    for key, title in CHECK_CATEGORIES.items():
        entry = report["problems"][key]
        if entry["count"]:
            lines.append(f"{title}: {entry['count']}")
            lines += [f"  {json.dumps(ex)}" for ex in entry["examples"]]
    lines.append("clean" if report["clean"] else f"{report['n_problems']} problem(s) found")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="scan annotations + features and report problems (exit 0 clean, 1 problems, 2 unusable)")
    c.add_argument("--dataset", required=True, help=f"one of {list(DATASETS)} (aliases: hl, charadesSTA)")
    c.add_argument("--root", required=True, type=Path, help="feature root (slowfast_features/, clip_features/, ...)")
    c.add_argument("--ann", nargs="+", type=Path, default=None, help="annotation jsonl files (default: *.jsonl in --root)")
    c.add_argument("--max-v-l", type=int, default=None, help="override the clip cap (<= 0: none)")
    c.add_argument("--examples", type=int, default=5, help="examples shown per problem kind")
    c.add_argument("--json", type=Path, default=None, help="also write the full report here")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    s = sub.add_parser("synth", help="write the synthetic QVHighlights-format dataset")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--n-train", type=int, default=None)
    s.add_argument("--n-val", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="regenerate even when the manifest matches")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "synth":
        from .synthetic import ensure_synthetic_dataset, make_synthetic_dataset

        kwargs = {k: v for k, v in (("n_train", args.n_train), ("n_val", args.n_val)) if v is not None}
        try:
            if args.force:
                make_synthetic_dataset(args.out, seed=args.seed, **kwargs)
            else:
                ensure_synthetic_dataset(args.out, seed=args.seed, **kwargs)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"synthetic dataset ready in {args.out}")
        return 0
    try:
        if args.ann:
            ann = list(args.ann)
        else:
            ann = sorted(p for p in args.root.glob("*.jsonl") if p.is_file()) if args.root.is_dir() else []
        overrides = {} if args.max_v_l is None else {"max_v_l": args.max_v_l}
        spec = feature_spec_for(args.dataset, args.root if args.root.is_dir() else None, **overrides)
        report = check_dataset(args.dataset, args.root, ann, spec, max_examples=args.examples,
                               progress=not args.quiet)
    except (DataError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["clean"] else 1


__all__ = [
    "DATASETS", "LABEL_RULES", "DataError", "FeatureSpec", "feature_spec_for", "canonical_dataset",
    "read_array", "read_array_shape", "find_feature_file", "l2_normalize", "temporal_endpoint_features",
    "read_video_features", "read_text_features", "read_audio_features", "Annotations", "load_annotations",
    "validate_record", "window_problems", "span_labels_from_windows", "saliency_labels_all",
    "saliency_labels_sub_as_query", "saliency_labels_tvsum", "MomentDataset", "collate", "EpochShuffleSampler",
    "make_loader", "check_dataset", "format_report", "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
