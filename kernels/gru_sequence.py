"""nn.GRU's full output sequence as one opaque op with a backward, for *compiled training* (issue 15).

Why: dynamo traces an ``nn.GRU`` call (``allow_rnn``) by unrolling its time loop, so the compiled graph
holds L copies of the cell, forward and backward, and specialises on L: every new batch length is a
recompile. The highlight head's GRU (``reference.heads.HighlightDetectionHead.gru``) is the only RNN in
LD-DETR; as this op it is one node of any length, forward and backward.

* ``ld_detr::gru_sequence(x, w_ih, w_hh, b_ih, b_hh) -> out`` — x (B, L, D) batch-first, h0 = 0, out
  (B, L, H): exactly ``nn.GRU(D, H, batch_first=True)(x)[0]`` (the same ``torch._VF.gru`` call).
* ``ld_detr::gru_sequence_backward(grad_out, x, w_ih, w_hh, b_ih, b_hh) -> (dx, dw_ih, dw_hh, db_ih, db_hh)``
  — recomputes the forward (``torch.func.vjp``) and returns the gradients nn.GRU's own backward gives (the
  forward saves only its inputs; the recompute costs one more GRU forward per step).

:class:`kernels.modules.SequenceGRU` (swapped in by :func:`kernels.apply`) calls it only while
``torch.compile`` traces and autocast is off (under autocast the dtype rules of ``nn.GRU`` differ per
device, so that case keeps dynamo's unrolled trace); eager calls are ``nn.GRU`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gru(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    h0 = x.new_zeros((1, x.shape[0], w_hh.shape[1]))
    # input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first
    out, _ = torch._VF.gru(x, h0, [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, True)
    return out


@torch.library.custom_op("ld_detr::gru_sequence", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def gru_sequence_op(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """x (B, L, D), nn.GRU weights -> all hidden states (B, L, H), h0 = 0."""
    with torch.no_grad():
        return _gru(x.contiguous(), w_ih, w_hh, b_ih, b_hh)


@gru_sequence_op.register_fake
def _(x, w_ih, w_hh, b_ih, b_hh):
    return x.new_empty((x.shape[0], x.shape[1], w_hh.shape[1]))


@torch.library.custom_op("ld_detr::gru_sequence_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def gru_sequence_backward_op(grad_out: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                             b_hh: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_out * gru_sequence(x, ...)) w.r.t. x and the four weights."""
    # torch.func.vjp, not autograd: an op's kernel runs below the autograd dispatch key, where
    # enable_grad records nothing; functorch's transforms work there
    inputs = [t.detach().contiguous() for t in (x, w_ih, w_hh, b_ih, b_hh)]
    _, vjp_fn = torch.func.vjp(_gru, *inputs)
    return tuple(g.contiguous() for g in vjp_fn(grad_out.contiguous()))


@gru_sequence_backward_op.register_fake
def _(grad_out, x, w_ih, w_hh, b_ih, b_hh):
    return tuple(torch.empty_like(t) for t in (x, w_ih, w_hh, b_ih, b_hh))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    x, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
    return torch.ops.ld_detr.gru_sequence_backward(grad_out.contiguous(), x, w_ih, w_hh, b_ih, b_hh)


gru_sequence_op.register_autograd(_backward, setup_context=_setup_context)

GRU_SEQUENCE_OP = torch.ops.ld_detr.gru_sequence.default


def gru_sequence(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """``nn.GRU(D, H, batch_first=True)(x)[0]`` with h0 = 0 as one op (differentiable): x (B, L, D) ->
    (B, L, H). Weights in nn.GRU's layout (w_ih (3H, D), w_hh (3H, H), b_ih/b_hh (3H,)), x's dtype."""
    return GRU_SEQUENCE_OP(x, w_ih, w_hh, b_ih, b_hh)


__all__ = ["gru_sequence", "GRU_SEQUENCE_OP"]
