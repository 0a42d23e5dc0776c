"""--cuda-graph: bucket padding (tested on CPU) and the captured step (needs a CUDA device)."""

import pytest
import torch

from engine.cuda_graph import bucket_of, length_buckets, pad_batch
from engine.train import TrainError, build_parser, train


def test_length_buckets():
    assert length_buckets(60, cap=75) == [60] and length_buckets(90, cap=75) == [75]
    assert length_buckets(70, cap=None, step=32) == [32, 64, 96]
    assert bucket_of(33, [32, 64, 96]) == 64 and bucket_of(32, [32, 64]) == 32
    with pytest.raises(ValueError, match="longer than the largest bucket 64"):
        bucket_of(65, [32, 64])


def test_pad_batch_masks_the_padding():
    b = {"video": torch.randn(2, 5, 3), "video_mask": torch.ones(2, 5, dtype=torch.bool),
         "text": torch.randn(2, 4, 6), "text_mask": torch.ones(2, 4, dtype=torch.bool),
         "targets": {"saliency_all_labels": torch.ones(2, 5), "span_mask": torch.ones(2, 5, dtype=torch.bool)}}
    p = pad_batch(b, 8, 6)
    assert p["video"].shape == (2, 8, 3) and p["video_mask"][:, 5:].sum() == 0 and p["video"][:, 5:].abs().sum() == 0
    assert p["text"].shape == (2, 6, 6) and p["text_mask"].sum() == 8
    assert p["targets"]["saliency_all_labels"].shape == (2, 8) and p["targets"]["span_mask"].shape == (2, 5)
    with pytest.raises(ValueError, match="down to the bucket 4"):
        pad_batch(b, 4, 6)


def test_cuda_graph_refused_without_cuda(tiny_synthetic, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is for CPU-only runs")
    args = build_parser().parse_args(["--data-root", str(tiny_synthetic), "--dataset", "synthetic", "--out",
                                      str(tmp_path / "r"), "--epochs", "1", "--cuda-graph", "--device", "cpu",
                                      "--quiet", "--set", "queue_length=16", "--batch-size", "4"])
    with pytest.raises(TrainError, match="--cuda-graph needs a CUDA device"):
        train(args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device (none here)")
def test_captured_step_equals_eager_step(tiny_synthetic):
    """On a GPU: 10 replayed steps give the eager step's losses (same seed, valid-clip BN on both)."""
    from engine.cuda_graph import CudaGraphStep
    from engine.data import MomentDataset, load_annotations, make_loader
    from engine.features import feature_spec_for
    from engine.step import TrainStep, batch_to_device, make_optimizer
    from reference import LDDETR, LDDETRConfig
    from reference.losses import build_criterion

    dev = torch.device("cuda")
    spec = feature_spec_for("synthetic", tiny_synthetic)
    cfg = LDDETRConfig.preset("qvhighlights", v_feat_dim=spec.v_feat_dim, t_feat_dim=spec.t_feat_dim,
                              queue_length=16, bn_stats="valid", dropout=0.0, input_dropout=0.0, v2t_dropout=0.0)
    ds = MomentDataset(load_annotations(tiny_synthetic / "train.jsonl"), tiny_synthetic, spec, dataset="synthetic")
    batches = [pad_batch(batch_to_device(b, dev), 16, 32) for b in make_loader(ds, 4, drop_last=True)] * 3
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = LDDETR(cfg).to(dev).train()
        crit = build_criterion(cfg).to(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg.lr, cfg.wd, dev)
        step = TrainStep(model, crit, opt, params, grad_clip=cfg.grad_clip, device=dev)
        if graphed:
            step = CudaGraphStep(step, lambda: [*model.state_dict(keep_vars=True).values(),
                                                *(t for s in opt.state.values() for t in s.values())])
        losses = []
        for b in batches[:10]:
            step.set_alpha(0.3)
            losses.append(float(step(b)["loss"]))
        runs.append(torch.tensor(losses))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-5)
