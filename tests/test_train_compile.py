"""engine.train_compile: the CPU ``--compile`` policy (conv blocks compiled in place) computes the reference's
training forward and gradients on padded batches (aot_eager: the same capture and autograd split inductor
gets, without minutes of codegen)."""

from __future__ import annotations

import copy

import torch

import kernels
from conftest import random_batch, rel
from engine.train_compile import CPU_REGIONS, compile_for_training
from reference import LDDETR, LDDETRConfig


def test_cpu_regions_match_the_reference_forward_and_gradients(fresh_seed):
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=18, t_feat_dim=14, queue_length=16, dim_feedforward=64,
                              num_convolutional_blocks=2)
    ref = LDDETR(cfg).train()
    model = kernels.apply(copy.deepcopy(ref), "torch")
    torch._dynamo.reset()
    assert compile_for_training(model, model, torch.device("cpu"), "aot_eager") is model
    assert sum(isinstance(m, CPU_REGIONS) for m in model.modules()) == 1  # the conv-block stack
    for lengths, words in (([23, 17, 5], [7, 3, 6]), ([9, 9], [4, 2])):  # two lengths: no stale specialisation
        video, vmask, text, tmask = random_batch(cfg, lengths, words)  # noisy padding beyond each length
        outs = []
        for m in (ref, model):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(fresh_seed)  # the same dropout draws
            out = m(video, vmask, text, tmask, alpha=0.3)
            (out["pred_spans"].sum() + (out["saliency_scores"] * vmask).sum() + out["pred_logits"].sum()).backward()
            outs.append(out)
        for key in ("pred_spans", "pred_logits"):
            assert rel(outs[1][key], outs[0][key]) < 1e-5, key
        assert rel(outs[1]["saliency_scores"][vmask], outs[0]["saliency_scores"][vmask]) < 1e-5
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            if p.grad is not None and p.grad.norm() > 1e-4:  # parameters whose true gradient is ~0 carry only noise
                assert rel(q.grad, p.grad) < 1e-4, name


def test_cpu_regions_compile_few_graphs_over_a_training_run():
    """Train and eval calls at batches on both sides of 16 and several lengths (what a run with evaluation
    does) give at most 4 graphs of the compiled region, well under dynamo's recompile limit (8): compiling each
    ConvolutionalBlock on its own made 8 (its first call reads a permuted view, the others fresh tensors) and
    the built-in job's evaluation hit the limit."""
    from torch._dynamo.utils import counters

    from reference.conv_blocks import ConvolutionalBlocks

    torch._dynamo.reset()
    counters.clear()
    blocks = ConvolutionalBlocks(24, 3)
    wrapper = torch.nn.Sequential(blocks)
    compile_for_training(wrapper, wrapper, torch.device("cpu"), "aot_eager")
    for b, length, train in [(32, 28, True), (32, 30, True), (8, 28, True), (32, 28, False), (8, 28, False),
                             (12, 40, False), (20, 17, True), (3, 9, False), (17, 5, False)]:
        blocks.train(train)
        x = torch.randn(length, b, 24, requires_grad=train)
        keep = torch.arange(length)[None, :] < torch.randint(1, length + 1, (b, 1))
        with torch.set_grad_enabled(train):
            y = blocks(x, keep)
            if train:
                y.sum().backward()
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
