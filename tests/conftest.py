"""Shared fixtures: a fixed seed for every test, a small-input-dim config, and the shared/ data folder."""

from __future__ import annotations

import collections
import copy
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels in the CPU interpreter; must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode

from bench.engine_cases import randomize_bn_stats_  # noqa: F401 - re-exported to the tests
from reference import LDDETRConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_seed() -> int:
    """A new seed per run (kernel parity must hold on any input), printed so a failure can be replayed
    with ``LDDETR_TEST_SEED=<seed>``."""
    seed = int(os.environ.get("LDDETR_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"LDDETR_TEST_SEED={seed}")
    return seed


@pytest.fixture
def small_cfg() -> LDDETRConfig:
    """The QVHighlights architecture (d=256, all layer counts) with small input dims and a small queue."""
    return LDDETRConfig.preset("qvhighlights", v_feat_dim=34, t_feat_dim=24, queue_length=64)


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found (tests read ../shared beside the repository)")
    return path


def random_batch(cfg: LDDETRConfig, lengths, text_lengths, pad_value: str = "noise"):
    """Features with per-sample lengths; padded positions hold random noise (so any leak shows)."""
    b, t, n = len(lengths), max(lengths), max(text_lengths)
    video = torch.randn(b, t, cfg.v_feat_dim)
    text = torch.randn(b, n, cfg.t_feat_dim)
    vmask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    tmask = torch.arange(n)[None] < torch.tensor(text_lengths)[:, None]
    if pad_value == "zeros":
        video = video * vmask[..., None]
        text = text * tmask[..., None]
    return video, vmask, text, tmask


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in the real on-disk layout (shared by the engine tests)."""
    from engine.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny_synthetic")
    make_synthetic_dataset(root, n_train=16, n_val=8, min_clips=8, max_clips=12)
    return root


@pytest.fixture
def strict_fp32():
    """On a GPU torch's fp32 convolutions default to TF32 (~1e-4 off); a reference must be true fp32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a region dispatches (``counts["aten._local_scalar_dense"]`` = host syncs)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


# ---- output comparison shared by the fused-model and engine tests -------------------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius-norm error of ``a`` against ``b``."""
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def top1(logits: torch.Tensor) -> torch.Tensor:
    """The highlight head's top-1 query per sample (the argmax the saliency slice depends on)."""
    return logits.float().softmax(-1)[..., 0].argmax(1)


def output_errors(ref: dict, out: dict, vmask: torch.Tensor) -> tuple[dict, int]:
    """Per output, the relative Frobenius error of ``out`` against ``ref``; saliency on the valid clips of the
    samples where both pick the same top-1 window (error relative to the whole valid output). Asserts that no
    decisive top-1 pick flipped; returns (errors, number of flipped samples)."""
    errors = {}
    for key in ("pred_logits", "pred_spans"):
        assert out[key].shape == ref[key].shape, key
        errors[key] = rel(out[key], ref[key])
    assert out["saliency_scores"].shape == ref["saliency_scores"].shape
    same = top1(out["pred_logits"]) == top1(ref["pred_logits"])
    p = ref["pred_logits"].double().softmax(-1)[..., 0].topk(min(2, ref["pred_logits"].shape[1]), dim=1).values
    decisive = p[:, 0] - p[:, -1] > 1e-4  # a top-1 pick that fp32 rounding cannot flip
    assert same[decisive].all(), f"decisive top-1 windows flipped: samples {(~same & decisive).nonzero().flatten().tolist()}"
    keep = vmask.bool() & same[:, None]
    if not keep.any():  # every sample a near-tie (e.g. T=1: all queries see the same single clip)
        assert not decisive.any()
        errors["saliency_scores"] = 0.0
    else:  # error on the compared clips, relative to the norm of the whole valid output (a near-zero subset
        # alone would turn fp32 rounding of its non-zero terms into a large relative error)
        s_out, s_ref = out["saliency_scores"].double(), ref["saliency_scores"].double()
        errors["saliency_scores"] = ((s_out - s_ref)[keep].norm() / s_ref[vmask.bool()].norm().clamp_min(1e-30)).item()
    return errors, int((~same).sum())


def compare(ref: dict, out: dict, vmask: torch.Tensor, tol: float) -> int:
    """Each output within ``tol`` of ``ref`` (see :func:`output_errors`). Returns the number of flipped samples
    (as ``export --verify`` reports)."""
    errors, flips = output_errors(ref, out, vmask)
    for key, err in errors.items():
        assert err <= tol, f"{key}: relative error {err:.2e} > {tol:.0e}"
    return flips


def compare_to_reference(model, batch, ref: dict, out: dict, tol: float) -> int:
    """:func:`compare` against the fp32 reference ``ref = model(*batch)``; where an output is ill-conditioned
    (e.g. a near-zero saliency vector) the fp32 reference's own rounding error can exceed ``tol``: then the
    candidate must be as close to a float64 run of the reference as the fp32 reference is (within 2x, and
    ``tol`` always allowed; 4x for saliency, a dot product R . u whose terms cancel: e.g. charades, T=2, no
    encoder layers, seed 3: saliency ~0.05, the fp32 reference 4.4e-6 off float64, the fused 1.5e-5). A real
    error still fails: the fp32 reference is accurate wherever it agrees with float64 to ``tol``."""
    errors, flips = output_errors(ref, out, batch[1])
    if all(err <= tol for err in errors.values()):
        return flips
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref64 = m64(*[t.double() if t.is_floating_point() else t for t in batch])
    own, _ = output_errors(ref64, ref, batch[1])  # the fp32 reference's own error
    ours, flips = output_errors(ref64, out, batch[1])
    for key, err in ours.items():
        if errors[key] > tol:
            bound = max(tol, (4 if key == "saliency_scores" else 2) * own[key])
            assert err <= bound, (f"{key}: relative error {errors[key]:.2e} vs the fp32 reference, {err:.2e} vs "
                                  f"float64 > {bound:.1e} (the fp32 reference's own error: {own[key]:.2e})")
    return flips


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random-weight CLIP model + tokenizer folder (``transformers`` save_pretrained)."""
    from extract_helpers import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
