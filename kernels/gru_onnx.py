"""ONNX translation of ``torch.ops.ld_detr.gru_last_state`` (``kernels/gru.py``): ONE standard ``GRU`` node.

    torch.onnx.export(model, args, dynamo=True, custom_translation_table=kernels.gru.onnx_translation_table())

The op is exactly what ONNX's GRU computes with ``linear_before_reset=1`` (PyTorch's n-gate
``tanh(W_in x + b_in + r * (W_hn h + b_hn))``), h0 = 0, and ``sequence_lens = steps``: ``Y_h`` is each
sample's state after its own length. What changes is the layout:

* gate order: PyTorch stacks (r, z, n), ONNX (z, r, h) -> rows of W_ih, W_hh, b_ih, b_hh permuted by one
  ``Gather`` each (on initializers: folded by the exporter or by onnxruntime at session start);
* W (1, 3H, D), R (1, 3H, H), B (1, 6H) = [Wb | Rb]; X time-major (L, B, D) (a ``Transpose``: onnxruntime's
  CPU GRU does not implement ``layout=1``); sequence_lens int32;
* ``Y_h`` (1, B, H) -> (B, H).

fp16/bf16 graphs are cast to fp32 around the node (onnxruntime's CPU GRU takes fp32 only), which also keeps
the state in fp32 as the torch and Triton paths do.
"""

from __future__ import annotations

import onnx
from onnxscript import opset18 as op

_FLOAT = onnx.TensorProto.FLOAT


def _gate_order(hidden: int) -> list[int]:
    """Row permutation (r, z, n) -> (z, r, n) of a (3H, ...) nn.GRU weight."""
    return list(range(hidden, 2 * hidden)) + list(range(hidden)) + list(range(2 * hidden, 3 * hidden))


def gru_onnx(x, w_ih, w_hh, b_ih, b_hh, steps, backend: str = "auto"):
    """x (B, L, D), nn.GRU weights, steps (B,) int64 -> (B, H): one ONNX GRU node (the backend is ignored)."""
    hidden = int(w_hh.shape[1])
    dtype = int(x.dtype)
    if dtype != _FLOAT:
        x, w_ih, w_hh, b_ih, b_hh = (op.Cast(t, to=_FLOAT) for t in (x, w_ih, w_hh, b_ih, b_hh))
    perm = op.Constant(value_ints=_gate_order(hidden))
    w = op.Unsqueeze(op.Gather(w_ih, perm, axis=0), [0])  # (1, 3H, D)
    r = op.Unsqueeze(op.Gather(w_hh, perm, axis=0), [0])  # (1, 3H, H)
    b = op.Unsqueeze(op.Concat(op.Gather(b_ih, perm, axis=0), op.Gather(b_hh, perm, axis=0), axis=0), [0])  # (1, 6H)
    _, y_h = op.GRU(op.Transpose(x, perm=[1, 0, 2]), w, r, b, op.Cast(steps, to=onnx.TensorProto.INT32),
                    hidden_size=hidden, linear_before_reset=1)
    h = op.Squeeze(y_h, [0])  # (B, H)
    return h if dtype == _FLOAT else op.Cast(h, to=dtype)
