"""Shared fixtures: a fixed seed for every test, a small-input-dim config, and the shared/ data folder."""

from __future__ import annotations

import collections
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
KEYS = ("pred_logits", "pred_spans")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius-norm error of ``a`` against ``b``."""
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def top1(logits: torch.Tensor) -> torch.Tensor:
    """The highlight head's top-1 query per sample (the argmax the saliency slice depends on)."""
    return logits.float().softmax(-1)[..., 0].argmax(1)


def compare(ref: dict, out: dict, vmask: torch.Tensor, tol: float) -> int:
    """Each output within ``tol`` (relative Frobenius); saliency on the valid clips of the samples where both
    pick the same top-1 window (error relative to the whole valid output). Returns the number of flipped samples (as ``export --verify`` reports)."""
    for key in KEYS:
        assert out[key].shape == ref[key].shape, key
        err = rel(out[key], ref[key])
        assert err <= tol, f"{key}: relative error {err:.2e} > {tol:.0e}"
    same = top1(out["pred_logits"]) == top1(ref["pred_logits"])
    p = ref["pred_logits"].double().softmax(-1)[..., 0].topk(min(2, ref["pred_logits"].shape[1]), dim=1).values
    decisive = p[:, 0] - p[:, -1] > 1e-4  # a top-1 pick that fp32 rounding cannot flip
    assert same[decisive].all(), f"decisive top-1 windows flipped: samples {(~same & decisive).nonzero().flatten().tolist()}"
    keep = vmask.bool() & same[:, None]
    if not keep.any():  # every sample a near-tie (e.g. T=1: all queries see the same single clip)
        assert not decisive.any()
        return int((~same).sum())
    # error on the compared clips, relative to the norm of the whole valid output (a near-zero subset alone
    # would turn fp32 rounding of its non-zero terms into a large relative error)
    s_out, s_ref = out["saliency_scores"].double(), ref["saliency_scores"].double()
    err = ((s_out - s_ref)[keep].norm() / s_ref[vmask.bool()].norm().clamp_min(1e-30)).item()
    assert err <= tol, f"saliency_scores: relative error {err:.2e} > {tol:.0e}"
    return int((~same).sum())


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random-weight CLIP model + tokenizer folder (``transformers`` save_pretrained)."""
    from extract_helpers import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
