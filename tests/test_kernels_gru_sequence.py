"""``kernels.gru_sequence``: nn.GRU's output sequence as one differentiable op for compiled training, and the
``SequenceGRU`` swap that uses it only while ``torch.compile`` traces (issue 15: no recompile per length)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.gru_sequence import GRU_SEQUENCE_OP, gru_sequence
from kernels.modules import SequenceGRU


def _pair(d=7, h=5):
    ref = torch.nn.GRU(d, h, batch_first=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.8, 0.8)  # larger than the default init: saturating gates are exercised too
    swapped = kernels.apply(torch.nn.Sequential(torch.nn.GRU(d, h, batch_first=True)))[0]
    swapped.load_state_dict(ref.state_dict())
    return ref, swapped


def _loss_and_grads(gru_fn, module, x, weight):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = gru_fn(x)
    loss = (out * weight).sum()
    loss.backward()
    return out.detach(), [x.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("b,length", [(1, 1), (3, 2), (2, 37), (4, 75)])
def test_op_forward_and_backward_equal_nn_gru(fresh_seed, b, length):
    ref, _ = _pair()
    x = torch.randn(b, length, 7)
    weight = torch.randn(b, length, 5)  # a random upstream gradient: every output position matters
    out_ref, g_ref = _loss_and_grads(lambda t: ref(t)[0], ref, x, weight)
    w = [ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0]
    out, g = _loss_and_grads(lambda t: gru_sequence(t, *w), ref, x, weight)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_swap_is_nn_gru_in_eager(fresh_seed):
    ref, swapped = _pair()
    assert type(swapped) is SequenceGRU
    x = torch.randn(3, 11, 7)
    torch.testing.assert_close(swapped(x), ref(x), rtol=0, atol=0)
    h0 = torch.randn(1, 3, 5)  # an initial state takes nn.GRU's own path
    torch.testing.assert_close(swapped(x, h0), ref(x, h0), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_swap_is_one_op_and_does_not_recompile_per_length(fresh_seed, backend):
    ref, swapped = _pair()
    seen_ops: list = []

    def count_backend(gm, example_inputs):
        seen_ops.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward if backend == "eager" else torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(swapped, dynamic=True, backend=count_backend)
    for length in (3, 17, 2, 30):
        x = torch.randn(2, length, 7)
        weight = torch.randn(2, length, 5)
        with torch._dynamo.config.patch(allow_rnn=True):
            out, g = _loss_and_grads(lambda t: compiled(t)[0], swapped, x, weight)
        out_ref, g_ref = _loss_and_grads(lambda t: ref(t)[0], ref, x, weight)
        torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-7)
        for a, e in zip(g, g_ref):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    # one graph for all four lengths, holding the op once (dynamo's unrolled GRU would hold L cells)
    assert seen_ops.count(GRU_SEQUENCE_OP) == 1, seen_ops
    assert not any("gru" in str(t) and t is not GRU_SEQUENCE_OP for t in seen_ops), seen_ops


def test_compiled_plain_gru_would_recompile_per_length():
    """The failure the op removes: dynamo's unrolled nn.GRU is specialised on the length (so this test
    fails, and the op can be retired, once torch traces RNNs symbolically)."""
    gru = torch.nn.GRU(4, 3, batch_first=True)
    graphs = []

    def count_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(gru, dynamic=True, backend=count_backend)
    with torch._dynamo.config.patch(allow_rnn=True):
        for length in (3, 5, 8):
            compiled(torch.randn(2, length, 4))
    assert len(graphs) >= 2


def test_whole_forward_compile_is_one_graph_for_every_length(fresh_seed):
    """The CUDA ``--compile`` policy (engine.train_compile: the whole forward, dynamic) on a kernels.apply'd
    LD-DETR: one graph without a break, the head's GRU as one op, no recompile when the length changes
    (with nn.GRU unrolled, every new batch length was a recompile)."""
    from engine.train_compile import compile_for_training
    from reference import LDDETR, LDDETRConfig

    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=12, t_feat_dim=10, dim_feedforward=48, num_v2t_encoder_layers=1, num_encoder1_layers=1,
                              num_convolutional_blocks=1, num_encoder2_layers=1, num_decoder_layers=2,
                              queue_length=16)
    model = kernels.apply(LDDETR(cfg).train(), "torch")
    graphs: list = []

    def count_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run = compile_for_training(model, model, torch.device("cuda"), backend=count_backend)  # the policy only
    for length, words in ((9, 5), (14, 7), (6, 4)):
        video, text = torch.randn(3, length, 12), torch.randn(3, words, 10)
        vmask, tmask = torch.ones(3, length, dtype=torch.bool), torch.ones(3, words, dtype=torch.bool)
        vmask[1, length - 2:] = False
        tmask[2, words - 1:] = False
        with torch._dynamo.config.patch(allow_rnn=True):  # as the training step sets it
            out = run(video, vmask, text, tmask, alpha=torch.tensor(0.3, dtype=torch.float64))
        out["saliency_scores"].sum().backward()
    assert len(graphs) == 1, f"{len(graphs)} graphs (a graph break or a recompile)"
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(GRU_SEQUENCE_OP) == 1
