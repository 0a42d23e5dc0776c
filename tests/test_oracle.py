"""Official-implementation oracle (../shared/data/official_oracle): converted official weights reproduce the
official outputs, and the official state_dict layout (../shared/spec/official-state-dict.tsv) loads strictly."""

from __future__ import annotations

import ast
import csv

import numpy as np
import pytest
import torch

from conftest import shared_path
from reference import LDDETR, LDDETRConfig, convert_official_state_dict, infer_config_overrides
from reference.heads import top1_slice_bounds


@pytest.fixture(scope="module")
def oracle():
    from safetensors.torch import load_file

    root = shared_path("data", "official_oracle")
    sd = load_file(str(root / "weights.safetensors"))
    inputs = {k: torch.from_numpy(v) for k, v in np.load(root / "inputs.npz").items()}
    expected = dict(np.load(root / "outputs_release.npz"))
    return sd, inputs, expected


def _model(sd, loops: int) -> LDDETR:
    cfg = LDDETRConfig.preset("qvhighlights", decoder_loops=loops, **infer_config_overrides(sd))
    model = LDDETR(cfg)
    model.load_state_dict(convert_official_state_dict(sd), strict=True)
    return model.eval()


def _run(model, inputs):
    with torch.no_grad():
        return model(inputs["src_vid"], inputs["src_vid_mask"], inputs["src_txt"], inputs["src_txt_mask"])


def test_release_loop_reproduces_official_outputs(oracle):
    sd, inputs, expected = oracle
    model = _model(sd, loops=1)
    out = _run(model, inputs)
    got = {
        "pred_logits": out["pred_logits"], "pred_spans": out["pred_spans"],
        "saliency_scores": out["saliency_scores"],
        "aux_0_pred_logits": out["aux_outputs"][0]["pred_logits"],
        "aux_0_pred_spans": out["aux_outputs"][0]["pred_spans"],
    }
    for key, value in got.items():
        err = float(np.abs(value.numpy() - expected[key]).max())
        assert err <= 5e-6, f"{key}: max abs error {err:.3g}"  # the README's claim (1.9e-6 measured)
    # the official top-1 queries and clip slices (oracle README)
    lengths = inputs["src_vid_mask"].sum(1).long()
    start, stop = top1_slice_bounds(out["pred_logits"], out["pred_spans"], lengths, clip_length=2.0)
    assert out["pred_logits"].softmax(-1)[..., 0].argmax(1).tolist() == [4, 1, 1]
    assert list(zip(start.tolist(), (stop - 1).tolist())) == [(22, 64), (25, 29), (21, 28)]


def test_align_and_sim_losses_match_official(oracle):
    sd, inputs, expected = oracle
    model = _model(sd, loops=1)
    v, t = inputs["src_vid"], inputs["src_txt"]
    vm, tm = inputs["src_vid_mask"].bool(), inputs["src_txt_mask"].bool()
    with torch.no_grad():
        loss_align, loss_sim, _, _ = model.align_losses(v, vm, t, tm, model.video_encoder(v), model.text_encoder(t), 0.4)
    assert abs(float(loss_align) - float(expected["loss_align"])) <= 5e-6
    assert abs(float(loss_sim) - float(expected["loss_sim"])) <= 5e-6


def test_paper_loop_on_official_weights(oracle):
    """decoder_loops=3: the decoder runs three passes; outputs differ from the release's single pass."""
    sd, inputs, expected = oracle
    model = _model(sd, loops=3)
    out = _run(model, inputs)
    assert np.abs(out["pred_spans"].numpy() - expected["pred_spans"]).max() > 1e-3
    assert torch.isfinite(out["pred_logits"]).all()


def test_official_state_dict_layout_loads():
    """Every name/shape of the full-size official model maps onto this package (strict load)."""
    rows = list(csv.DictReader(open(shared_path("spec", "official-state-dict.tsv")), delimiter="\t"))
    sd = {r["name"]: torch.zeros(ast.literal_eval(r["shape"]), dtype=getattr(torch, r["dtype"])) for r in rows}
    assert len(sd) == 304
    cfg = LDDETRConfig.preset("qvhighlights", **infer_config_overrides(sd))
    assert (cfg.v_feat_dim, cfg.t_feat_dim, cfg.queue_length, cfg.num_convolutional_blocks) == (2818, 512, 65536, 5)
    converted = convert_official_state_dict(sd)
    assert len(converted) == 301  # minus the 3 unused txt_position_embed tensors
    LDDETR(cfg).load_state_dict(converted, strict=True)
    kept = convert_official_state_dict({"model": {"module." + k: v for k, v in sd.items()}}, use_txt_pos=True)
    LDDETR(LDDETRConfig(**{**cfg.to_dict(), "use_txt_pos": True})).load_state_dict(kept, strict=True)
    trainable = sum(np.prod(ast.literal_eval(r["shape"]), dtype=np.int64) for r in rows if r["requires_grad"] == "True")
    assert trainable == 11_927_848


def test_convert_rejects_foreign_state_dict():
    with pytest.raises(ValueError, match="does not look like an official LD-DETR state_dict"):
        convert_official_state_dict({"backbone.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="is a str, not a tensor"):
        convert_official_state_dict({"query_embed.weight": "x"})
