"""Shared launch helpers: backend resolution, input checks, dot precision (Liger ``ops/utils.py`` style).

Everything that decides *how* a kernel is launched lives here, so a bad input gets one clear error that
names the tensor, the value and the limit.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "torch")
PRECISIONS = ("auto", "ieee", "tf32", "tf32x3")
ENV_BACKEND = "LDDETR_KERNELS"


class KernelInputError(ValueError):
    """An input the Triton kernels cannot take (wrong dtype, layout, size or device)."""


_derived: dict[tuple[int, Hashable], tuple[weakref.ref, int, Any]] = {}


def derived(w: Tensor, tag: Hashable, make: Callable[[Tensor], Any]) -> Any:
    """``make(w)`` (a re-laid-out copy of a weight: oneDNN-packed, transposed, split in blocks; or a value
    read from it), computed once per (tensor, ``tag``) and cached while ``w`` lives unmodified: keyed by
    identity and ``_version``, so an in-place write or a new tensor after ``.to()`` makes it again, and the
    entry goes when the tensor does.
    A tensor made under ``torch.inference_mode`` has no version counter: ``make(w)`` every call. The copy is
    made outside inference mode, so that a derived tensor (the GRU's rescaled W_hh) can itself be the source of
    derived copies (its packed or blocked layouts) when the caller runs under ``torch.inference_mode``. Eager
    only (not inside torch.compile / export tracing)."""
    key = (id(w), tag)
    hit = _derived.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:  # a cached tensor is never an inference one
        return hit[2]
    if w.is_inference():
        return make(w)
    with torch.inference_mode(False):  # a normal tensor even under inference mode: it can key derived copies of its own
        out = make(w)
    if hit is None:
        weakref.finalize(w, _derived.pop, key, None)
    _derived[key] = (weakref.ref(w), w._version, out)
    return out


def derived_keys(tag_prefix: str) -> list[tuple[int, tuple]]:
    """(id of the source tensor, tag) of every cached :func:`derived` copy whose tag starts with ``tag_prefix``."""
    return [k for k in _derived if isinstance(k[1], tuple) and k[1][:1] == (tag_prefix,)]


def clear_derived(tag_prefix: str) -> None:
    """Forget every cached :func:`derived` copy whose tag is a tuple starting with ``tag_prefix``."""
    for key in derived_keys(tag_prefix):
        _derived.pop(key, None)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # looked up once: dynamo cannot trace find_spec


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" | "triton" | "torch" -> "triton" | "torch" for tensors on ``device``.

    "auto" is Triton on CUDA and torch otherwise; ``LDDETR_KERNELS=torch|triton`` overrides "auto".
    Forcing "triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (set before triton is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip().lower()
        if env:
            if env not in ("torch", "triton"):
                raise ValueError(f"{ENV_BACKEND} must be 'torch' or 'triton', got {env!r}")
            backend = env
        else:
            return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise KernelInputError("backend 'triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not interpreting():
            raise KernelInputError(
                f"backend 'triton' on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='torch'"
            )
    return backend


def check_tensor(name: str, t: Tensor, *, ndim: int, dtypes: tuple[torch.dtype, ...],
                 contiguous: bool = True) -> None:
    """Raise KernelInputError unless ``t`` has ``ndim`` dims, one of ``dtypes``, and (optionally) is contiguous."""
    if not isinstance(t, Tensor):
        raise KernelInputError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise KernelInputError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise KernelInputError(f"{name} dtype must be one of ({names}), got {str(t.dtype).replace('torch.', '')}")
    if contiguous and not t.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                               "call .contiguous() first")


def check_hidden_dim(name: str, d: int, *, multiple: int = 16, maximum: int = 512) -> None:
    if d % multiple != 0 or d > maximum or d <= 0:
        raise KernelInputError(f"{name}: hidden size must be a positive multiple of {multiple} and <= {maximum}, "
                               f"got {d}")


def dot_precision(precision: str, op: str = "matmul") -> str:
    """The ``tl.dot`` input precision for fp32 operands: "ieee" (exact fp32 FMAs), "tf32" (tensor cores,
    ~5e-4 relative) or "tf32x3" (three tf32 products, ~1e-7, but measured 10-30x slower than "tf32" with
    Triton 3.6 on an H200: an explicit choice only).

    "auto" follows torch's own defaults for the op the kernel replaces: a matmul ("matmul") is "ieee"
    when ``torch.get_float32_matmul_precision() == "highest"`` (torch's default) and "tf32" otherwise; a
    convolution ("conv") is "tf32" when ``torch.backends.cudnn.allow_tf32`` (torch's default for cuDNN
    convolutions) and "ieee" otherwise.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if op == "conv":
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
