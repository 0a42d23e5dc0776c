"""The feature contract and feature reading (spec ``ld-detr-code.md`` §6 "Features").

On-disk layout (the Moment-DETR / QD-DETR / CG-DETR feature packs)::

    ROOT/slowfast_features/{vid}.npz     key "features", (T, 2304)     .npy accepted as a fallback
    ROOT/clip_features/{vid}.npz         key "features", (T, 512)
    ROOT/clip_text_features/qid{qid}.npz key "last_hidden_state", (N, 512)   TACoS: {qid}.npz
    TVSum: ROOT/video_features/{vid}_rgb.npy + {vid}_opt.npy (concatenated, 2048), query_features/{qid}.npz "token"

Reading (exactly as the official loader): each video modality is truncated to ``max_v_l``, cast to float32 and
L2-normalised per row (``x / (||x|| + 1e-5)``); modalities are cut to the shortest and concatenated in order;
the temporal endpoint feature ``[t/T, (t+1)/T]`` is appended last (not normalised). Text tokens are truncated
to ``max_q_l`` and L2-normalised per token.

Bad files raise :class:`DataError` naming the file and the key / qid instead of failing later.
Annotations, labels and batching are in :mod:`engine.data`, the dataset check in :mod:`engine.data_check`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: canonical dataset names; "synthetic" is the QVHighlights format written by :mod:`engine.synthetic`.
DATASETS = ("qvhighlights", "charades", "tacos", "tvsum", "synthetic")
_ALIASES = {"hl": "qvhighlights", "qvhl": "qvhighlights", "qvhighlight": "qvhighlights",
            "charadessta": "charades", "charades_sta": "charades"}
NORM_EPS = 1e-5  # added to the L2 norm (official ``l2_normalize_np_array``)
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


# ---------------------------------------------------------------------------------------------------------
# Feature contract
# ---------------------------------------------------------------------------------------------------------
@dataclass
class FeatureSpec:
    """What the features on disk look like and how they are read (the "feature contract").

    ``video_parts`` maps a video dir to the file stems concatenated into that modality (default
    ``["{vid}"]``; TVSum: ``["{vid}_rgb", "{vid}_opt"]``). ``video_dims`` / ``text_dim`` are the per-modality
    channel counts (None = unknown: :meth:`resolve` reads them from the files). Audio features are not read
    (the model has no audio branch); contracts saved with ``audio_dir: None`` still load.
    """

    video_dirs: list[str] = field(default_factory=lambda: ["slowfast_features", "clip_features"])
    text_dir: str = "clip_text_features"
    text_key: str = "last_hidden_state"
    text_pattern: str = "qid{qid}"
    video_key: str = "features"
    video_parts: dict[str, list[str]] = field(default_factory=dict)
    video_dims: list[int] | None = None
    text_dim: int | None = None
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
        d = dict(d)
        for legacy in ("audio_dir", "audio_dim"):  # written by older versions, always None there
            value = d.pop(legacy, None)
            if value is not None:
                raise ValueError(f"FeatureSpec {legacy}={value!r}: audio features are not supported")
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
    ``max_v_l=-1``.
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
    if arr.ndim == 3 and arr.shape[0] == 1:  # stray leading batch dim (the official loaders drop it too)
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


_DISCOVERY_TRIES = 20  # files sampled while discovering dims (the check CLI reports the odd ones out)


def _most_common(dims: list[int]) -> int | None:
    """The dim most sampled files agree on (the first seen on ties): one bad first file must not define the
    contract for all the others."""
    if not dims:
        return None
    return max(dict.fromkeys(dims), key=dims.count)


def _discover_dim(folder: Path, glob: str, key: str) -> int | None:
    if not folder.is_dir():
        return None
    paths = sorted(p for p in folder.glob(glob) if p.suffix in _FEATURE_EXTS)
    dims = []
    for path in paths[:_DISCOVERY_TRIES]:
        try:
            dims.append(int(read_array_shape(path, key)[-1]))
        except DataError:
            continue
    return _most_common(dims)


def _discover_video_dim(root: Path, vdir: str, parts: list[str], key: str) -> int | None:
    folder = root / vdir
    if len(parts) == 1:
        return _discover_dim(folder, parts[0].replace("{vid}", "*"), key)
    prefix, _, suffix = parts[0].partition("{vid}")
    if not folder.is_dir():
        return None
    dims = []
    for path in sorted(p for p in folder.glob(f"{prefix}*{suffix}.*") if p.suffix in _FEATURE_EXTS)[:_DISCOVERY_TRIES]:
        vid = path.stem[len(prefix): len(path.stem) - len(suffix)]
        try:
            files = [find_feature_file(folder, p.format(vid=vid), "") for p in parts]
            dims.append(sum(int(read_array_shape(f, key)[-1]) for f in files))
        except DataError:
            continue
    return _most_common(dims)


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
