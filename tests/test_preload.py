"""--preload: batches cut from in-memory features equal the DataLoader's, epoch after epoch."""

import pytest
import torch

from engine.data import MomentDataset, load_annotations, make_loader
from engine.features import feature_spec_for
from engine.preload import PreloadedLoader


def _dataset(root):
    spec = feature_spec_for("synthetic", root)
    return MomentDataset(load_annotations(root / "train.jsonl"), root, spec, dataset="synthetic", max_windows=5,
                         seed=7)


@pytest.mark.parametrize("fp16", [False, True])
def test_preloaded_batches_equal_the_loaders(tiny_synthetic, fp16):
    ds = _dataset(tiny_synthetic)
    loader = make_loader(ds, 5, shuffle=True, seed=3)
    pre = PreloadedLoader(ds, 5, torch.device("cpu"), shuffle=True, seed=3, fp16=fp16)
    assert len(pre) == len(loader) == 4 and pre.nbytes > 0
    tol = dict(rtol=1e-3, atol=1e-3) if fp16 else dict(rtol=0, atol=0)
    for epoch in range(2):  # labels are re-drawn per epoch: both must follow
        ds.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        pre.sampler.set_epoch(epoch)
        for a, b in zip(loader, pre):
            assert a["meta"] == b["meta"]
            for k in ("video", "video_mask", "text", "text_mask"):
                assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
                torch.testing.assert_close(b[k], a[k], **(tol if k in ("video", "text") else {}))
            for k, v in a["targets"].items():
                if k == "span_labels":
                    assert all(torch.equal(x, y) for x, y in zip(v, b["targets"][k]))
                else:
                    assert torch.equal(v, b["targets"][k]), k


def test_preload_refuses_unlabelled_data(tiny_synthetic):
    spec = feature_spec_for("synthetic", tiny_synthetic)
    ds = MomentDataset(load_annotations(tiny_synthetic / "val.jsonl"), tiny_synthetic, spec, dataset="synthetic",
                       load_labels=False)
    with pytest.raises(Exception, match="must load labels"):
        PreloadedLoader(ds, 4, torch.device("cpu"))


def test_training_with_preload_is_the_same_run(tiny_synthetic, tmp_path):
    """--preload changes where batches come from, not what they are: the same losses and weights."""
    from engine.train import build_parser, train

    def run(out, *extra):
        args = build_parser().parse_args(["--data-root", str(tiny_synthetic), "--dataset", "synthetic", "--out",
                                          str(out), "--epochs", "1", "--set", "queue_length=16", "--batch-size", "4",
                                          "--max-steps-per-epoch", "3", "--quiet", *extra])
        train(args)
        return torch.load(out / "latest.pt", weights_only=True)

    a, b = run(tmp_path / "plain"), run(tmp_path / "pre", "--preload")
    assert a["resume"]["state"]["history"][0]["loss"] == b["resume"]["state"]["history"][0]["loss"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    log = (tmp_path / "pre" / "train.log").read_text()
    assert "preloaded 16 train items" in log and "batches/s" in log
