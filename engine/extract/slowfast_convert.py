"""PySlowFast's Caffe2 ``SLOWFAST_8x8_R50.pkl`` -> a SlowFast state_dict under pytorchvideo's names.

HERO_Video_Feature_Extractor (and so the moment-retrieval datasets' ``slowfast_features``) ran PySlowFast with
``TEST.CHECKPOINT_TYPE caffe2`` on https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/kinetics400/
SLOWFAST_8x8_R50.pkl. pytorchvideo's ``SLOWFAST_8x8_R50.pyth`` is another training run of the same network:
its features live in a different space, so a model trained on the datasets' features needs this ``.pkl``.

The ``.pkl`` is a Python-2 pickle ``{"blobs": {caffe2 name: numpy array}, ...}``; it is read with an unpickler
that only rebuilds numpy arrays (no code runs). Names follow PySlowFast's ``c2_model_loading`` convention
(``t_`` = fast pathway; the fusion after res{s} hangs off that stage's last ``branch2c_bn``)::

    pytorchvideo                                                     Caffe2 blob
    blocks.0.multipathway_blocks.{0,1}.conv.weight                   {,t_}conv1_w
    blocks.0.multipathway_blocks.{0,1}.norm.{weight,bias,            {,t_}res_conv1_bn_{s,b,rm,riv}
                                             running_mean,running_var}
    blocks.0.multipathway_fusion.conv_fast_to_slow.weight / norm.*   t_pool1_subsample_w / _bn_*
    blocks.{k}.multipathway_fusion.* (k = 1..3, s = k + 1)           t_res{s}_{last}_branch2c_bn_subsample_{w,bn_*}
    blocks.{k}.multipathway_blocks.{p}.res_blocks.{i}.               {,t_}res{s}_{i}_
        branch1_conv.weight / branch1_norm.*                             branch1_w / branch1_bn_*
        branch2.conv_{a,b,c}.weight / branch2.norm_{a,b,c}.*            branch2{a,b,c}_w / branch2{a,b,c}_bn_*
    blocks.6.proj.{weight,bias}                                      pred_{w,b}

No values change (PySlowFast copies the blobs as they are; ``riv`` is loaded as the running variance).
CLI: ``python -m engine.extract.slowfast_convert SLOWFAST_8x8_R50.pkl --out slowfast_c2.safetensors`` (exit 2 on
bad input; the old ``PKL OUT`` form still works); ``SlowFastExtractor(weights="...pkl")`` also converts on the fly.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .slowfast_net import SlowFastConfig, SlowFastNet

__all__ = ["c2_names", "read_c2_pickle", "convert_c2_state"]

_BN = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
_SAFE = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
         ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
         ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
         ("collections", "OrderedDict"), ("_codecs", "encode")}  # _codecs.encode: bytes in Python-3 protocol 2


def _c2_name(name: str, depths: tuple[int, ...]) -> str:
    """One pytorchvideo state-dict name -> its Caffe2 blob name (see the module table)."""
    def leaf(rest: str, prefix: str) -> str:  # "conv.weight" / "norm.running_var" under a c2 prefix
        kind, attr = rest.rsplit(".", 1)
        return f"{prefix}_w" if kind.startswith("conv") else f"{prefix}_bn_{_BN[attr]}"

    if m := re.fullmatch(r"blocks\.0\.multipathway_blocks\.([01])\.((?:conv|norm)\.\w+)", name):
        t = "t_" if m[1] == "1" else ""
        kind, attr = m[2].split(".")
        return f"{t}conv1_w" if kind == "conv" else f"{t}res_conv1_bn_{_BN[attr]}"
    if m := re.fullmatch(r"blocks\.([0-3])\.multipathway_fusion\.((?:conv_fast_to_slow|norm)\.\w+)", name):
        k = int(m[1])
        prefix = "t_pool1_subsample" if k == 0 else f"t_res{k + 1}_{depths[k - 1] - 1}_branch2c_bn_subsample"
        return leaf(m[2], prefix)
    if m := re.fullmatch(r"blocks\.([1-4])\.multipathway_blocks\.([01])\.res_blocks\.(\d+)\.(.+)", name):
        base = f"{'t_' if m[2] == '1' else ''}res{int(m[1]) + 1}_{m[3]}"
        if b := re.fullmatch(r"branch1_(conv|norm)\.(\w+)", m[4]):
            return f"{base}_branch1_w" if b[1] == "conv" else f"{base}_branch1_bn_{_BN[b[2]]}"
        if b := re.fullmatch(r"branch2\.(conv|norm)_([abc])\.(\w+)", m[4]):
            return f"{base}_branch2{b[2]}_w" if b[1] == "conv" else f"{base}_branch2{b[2]}_bn_{_BN[b[3]]}"
    if m := re.fullmatch(r"blocks\.6\.proj\.(weight|bias)", name):
        return f"pred_{m[1][0]}"
    raise KeyError(f"no Caffe2 name for {name}")


def _shapes(config: SlowFastConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # names and shapes only: no memory, no init
        return {k: tuple(v.shape) for k, v in SlowFastNet(config).state_dict().items()
                if not k.endswith("num_batches_tracked")}


def c2_names(config: SlowFastConfig | None = None) -> dict[str, str]:
    """pytorchvideo name -> Caffe2 blob name for every learned tensor of ``SlowFastNet(config)``."""
    config = config or SlowFastConfig()
    return {k: _c2_name(k, config.depths) for k in _shapes(config)}


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def read_c2_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``blobs`` of a Caffe2 checkpoint pickle (numpy arrays only; raises ValueError with one line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"SlowFast Caffe2 weights: no file {path}")
    try:
        obj = _NumpyOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"SlowFast Caffe2 weights {path}: unreadable ({type(e).__name__}: {first})") from None
    blobs = obj.get("blobs") if isinstance(obj, dict) else None
    if not isinstance(blobs, dict):
        raise ValueError(f"SlowFast Caffe2 weights {path}: no 'blobs' dict (not a PySlowFast Caffe2 checkpoint)")
    return blobs


def convert_c2_state(blobs: dict[str, np.ndarray], config: SlowFastConfig | None = None,
                     source: str = "Caffe2 weights") -> dict[str, Tensor]:
    """Caffe2 blobs -> fp32 state_dict under pytorchvideo names; every learned tensor must be present and fit."""
    config = config or SlowFastConfig()
    shapes, names = _shapes(config), c2_names(config)
    missing = [c2 for c2 in names.values() if c2 not in blobs]
    if missing:
        raise ValueError(f"SlowFast {source}: {len(missing)} blobs missing (e.g. {missing[:3]}); not PySlowFast's "
                         f"SlowFast {config.name}")
    out: dict[str, Tensor] = {}
    for ours, c2 in names.items():
        arr = np.asarray(blobs[c2])
        if arr.ndim < len(shapes[ours]):  # PySlowFast pads a blob's shape with trailing 1s (linear -> conv)
            arr = arr.reshape(arr.shape + (1,) * (len(shapes[ours]) - arr.ndim))
        if tuple(arr.shape) != shapes[ours]:
            raise ValueError(f"SlowFast {source}: blob {c2} has shape {tuple(arr.shape)}, {ours} needs {shapes[ours]}")
        out[ours] = torch.from_numpy(np.array(arr, dtype=np.float32))
    return out


def build_parser() -> argparse.ArgumentParser:
    from .. import cli

    p = cli.parser("python -m engine.extract.slowfast_convert",
                   "Rename PySlowFast's Caffe2 SLOWFAST_8x8_R50.pkl (the weights behind the datasets' SlowFast features) "
                   "to a .safetensors under pytorchvideo's names, for SlowFastExtractor(weights=) and engine.extract "
                   "--slowfast. No values change; the pickle is read by an unpickler that only rebuilds numpy arrays.",
                   "python -m engine.extract.slowfast_convert SLOWFAST_8x8_R50.pkl --out slowfast.safetensors")
    p.add_argument("pkl", metavar="PKL", help="PySlowFast Caffe2 checkpoint (SLOWFAST_8x8_R50.pkl)")
    p.add_argument("old_out", nargs="?", default=None, help=argparse.SUPPRESS)  # the old positional OUT
    p.add_argument("--out", default=None, metavar="FILE",
                   help="a file: the .safetensors written (default: PKL with .safetensors)")
    cli.add_device(p, note="the blobs are renamed with numpy")
    cli.add_quiet(p)
    return p


def output_path(args: argparse.Namespace) -> str:
    """``--out``, else the old positional OUT, else PKL with ``.safetensors``; ValueError (one line) when both
    spellings are given and differ."""
    if args.out is not None and args.old_out is not None and args.out != args.old_out:
        raise ValueError(f"two outputs: --out {args.out} and {args.old_out}; give --out only")
    out = args.out or args.old_out
    return out if out is not None else str(Path(args.pkl).with_suffix(".safetensors"))


def main(argv: list[str] | None = None) -> int:
    from .. import cli

    args = build_parser().parse_args(argv)
    try:  # checked before the pickle is read (no model runs here)
        cli.resolve_device(args.device)
        out = output_path(args)
        if not out.endswith(".safetensors"):
            raise ValueError(f"--out must end with .safetensors, got {out}")
        cli.check_writable(out)
        state = convert_c2_state(read_c2_pickle(args.pkl), source=f"Caffe2 weights {args.pkl}")
    except ValueError as e:
        return cli.fail(e)
    from safetensors.torch import save

    from ..atomic import atomic_open
    try:
        with atomic_open(out, "wb") as f:
            f.write(save(state, metadata={"source": Path(args.pkl).name, "format": "pytorchvideo SlowFast R50 8x8"}))
    except OSError as e:
        return cli.fail(cli.os_error_line(e))
    if not args.quiet:
        print(f"wrote {out}: {len(state)} tensors", file=sys.stderr)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
