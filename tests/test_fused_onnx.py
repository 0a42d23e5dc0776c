"""ONNX export of the fused model (what ``python -m export onnx`` writes) through onnxruntime at shapes the
export never saw, against the reference in torch; and the graph's node count against an export of the
reference's own schedule (printed; the README quotes the numbers)."""

from __future__ import annotations

import collections

import pytest
import torch

from conftest import compare, random_batch, randomize_bn_stats_
from export.model import ExportModule, Prepared
from export.onnx_export import export_onnx, onnx_runner
from reference import LDDETR, LDDETRConfig

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _nodes(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_fused_onnx_at_unseen_shapes_and_fewer_nodes(tmp_path):
    torch.manual_seed(0)
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=24, t_feat_dim=16, queue_length=8,
                              num_convolutional_blocks=3)
    model = randomize_bn_stats_(LDDETR(cfg).eval())
    from engine.inference import build

    fused = build(model, device="cpu", backend="torch").model
    ours = export_onnx(Prepared(ExportModule(fused).eval(), cfg, {}, "fused"), tmp_path / "fused.onnx")
    theirs = export_onnx(Prepared(ExportModule(model).eval(), cfg, {}, "reference"), tmp_path / "reference.onnx")
    import onnxslim

    slim = tmp_path / "fused_slim.onnx"
    onnx.save(onnxslim.slim(onnx.load(str(ours))), str(slim))
    n_ours, n_theirs, n_slim = _nodes(ours), _nodes(theirs), _nodes(slim)
    print(f"ONNX nodes: reference {sum(n_theirs.values())}, fused {sum(n_ours.values())}, fused + onnxslim "
          f"{sum(n_slim.values())}; fused top: {n_ours.most_common(8)}")
    assert n_ours["GRU"] == 1 and sum(n_ours.values()) < 0.8 * sum(n_theirs.values())
    assert sum(n_slim.values()) <= sum(n_ours.values())
    run = onnx_runner(ours)
    for lengths, texts in (([29, 17, 3], [11, 4, 7]), ([75], [1]), ([2, 2], [32, 9])):  # export saw (2, 75, 32)
        batch = random_batch(cfg, lengths, texts)
        with torch.no_grad():
            ref = model(*batch)
        got = dict(zip(("pred_logits", "pred_spans", "saliency_scores"), (torch.from_numpy(a) for a in run(*batch))))
        compare(ref, got, batch[1], 2e-5)
        if lengths == [75]:  # the slimmed graph computes the same
            slimmed = [torch.from_numpy(a) for a in onnx_runner(slim)(*batch)]
            assert all(torch.allclose(a, got[k], rtol=1e-5, atol=1e-6) for a, k in zip(slimmed, got))
