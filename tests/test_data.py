"""engine.data / engine.synthetic: feature reading, labels, batching, errors, the check CLI, the generator.

Every expected number is computed by hand from the spec (``ld-detr-code.md`` §6), not by the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import (
    DataError, FeatureSpec, MomentDataset, check_dataset, collate, feature_spec_for, load_annotations, make_loader,
    read_text_features, read_video_features, saliency_labels_sub_as_query, span_labels_from_windows,
)
from engine.data import main as data_main
from engine.synthetic import ensure_synthetic_dataset, make_synthetic_dataset, synthetic_is_ready
from reference import LDDETRConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SF, CL, TX = 6, 4, 5  # small hand-written dims: SlowFast, CLIP, text

TINY = dict(n_train=6, n_val=3, min_clips=8, max_clips=12, slowfast_dim=8, clip_dim=4, text_dim=4, n_concepts=4)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _npz(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _spec(**kw) -> FeatureSpec:
    base = dict(video_dims=[SF, CL], text_dim=TX, clip_length=2.0, max_v_l=75, max_q_l=32)
    base.update(kw)
    return FeatureSpec(**base)


def _write_video(root: Path, vid: str, t_sf: int, t_cl: int | None = None, seed: int = 0, scale: float = 7.0):
    rng = np.random.default_rng(seed)
    sf = scale * rng.standard_normal((t_sf, SF)).astype(np.float32)
    cl = scale * rng.standard_normal((t_cl or t_sf, CL)).astype(np.float32)
    _npz(root / "slowfast_features" / f"{vid}.npz", features=sf)
    _npz(root / "clip_features" / f"{vid}.npz", features=cl)
    return sf, cl


def _write_text(root: Path, stem: str, n: int, seed: int = 1, dim: int = TX) -> np.ndarray:
    tok = 3.0 * np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    _npz(root / "clip_text_features" / f"{stem}.npz", last_hidden_state=tok, pooler_output=tok[0])
    return tok


def _hand_norm(x: np.ndarray) -> np.ndarray:
    return x / (np.sqrt((x.astype(np.float64) ** 2).sum(-1, keepdims=True)) + 1e-5)


QVH_REC = {"qid": 7, "query": "a dog runs", "duration": 16, "vid": "v1", "relevant_clip_ids": [2, 3, 4, 6],
           "saliency_scores": [[1, 2, 1], [4, 4, 3], [0, 1, 0], [2, 2, 2]],  # sums 4, 11, 1, 6
           "relevant_windows": [[4, 10], [12, 14]]}


@pytest.fixture
def qvh_root(tmp_path):
    """One QVHighlights-format query: 8 clips of 2 s, 5 text tokens."""
    _write_video(tmp_path, "v1", 8)
    _write_text(tmp_path, "qid7", 5)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------
# feature reading
# ---------------------------------------------------------------------------------------------------------
def test_video_normalisation_tef_and_shortest_cut(tmp_path):
    sf, cl = _write_video(tmp_path, "v", 7, 9)  # clip has 2 extra clips: cut to the shortest (7)
    video = read_video_features(tmp_path, "v", _spec())
    assert video.dtype == np.float32 and video.shape == (7, SF + CL + 2)
    np.testing.assert_allclose(np.linalg.norm(video[:, :SF], axis=1), 1.0, atol=1e-5)  # each modality on its own
    np.testing.assert_allclose(np.linalg.norm(video[:, SF:SF + CL], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(video[:, :SF], _hand_norm(sf), atol=1e-6)
    np.testing.assert_allclose(video[:, SF:SF + CL], _hand_norm(cl[:7]), atol=1e-6)
    tef = np.array([[t / 7, (t + 1) / 7] for t in range(7)])
    np.testing.assert_allclose(video[:, -2:], tef, atol=1e-7)
    raw = read_video_features(tmp_path, "v", _spec(normalize_video=False, use_tef=False))
    np.testing.assert_array_equal(raw, np.concatenate([sf, cl[:7]], 1))


def test_video_truncation_max_v_l(tmp_path):
    sf, _ = _write_video(tmp_path, "v", 9)
    video = read_video_features(tmp_path, "v", _spec(max_v_l=4))
    assert video.shape == (4, SF + CL + 2)
    np.testing.assert_allclose(video[:, :SF], _hand_norm(sf[:4]), atol=1e-6)
    np.testing.assert_allclose(video[:, -2:], [[0, .25], [.25, .5], [.5, .75], [.75, 1]], atol=1e-7)  # TEF of T=4
    assert read_video_features(tmp_path, "v", _spec(max_v_l=-1)).shape[0] == 9  # <= 0: no cap


def test_text_normalisation_and_truncation(tmp_path):
    tok = _write_text(tmp_path, "qid3", 40)
    text = read_text_features(tmp_path, 3, _spec())
    assert text.shape == (32, TX) and text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(text, _hand_norm(tok[:32]), atol=1e-6)
    assert read_text_features(tmp_path, 3, _spec(max_q_l=3)).shape == (3, TX)


def test_npy_fallback_and_npz_preferred(tmp_path):
    sf, _ = _write_video(tmp_path, "v", 5)
    (tmp_path / "clip_features" / "v.npz").unlink()
    cl = np.arange(5 * CL, dtype=np.float64).reshape(5, CL) + 1
    np.save(tmp_path / "clip_features" / "v.npy", cl)
    video = read_video_features(tmp_path, "v", _spec())
    np.testing.assert_allclose(video[:, SF:SF + CL], _hand_norm(cl), atol=1e-6)
    np.save(tmp_path / "slowfast_features" / "v.npy", np.zeros((5, SF)))  # both exist: .npz wins
    np.testing.assert_allclose(read_video_features(tmp_path, "v", _spec())[:, :SF], _hand_norm(sf), atol=1e-6)


def test_tacos_text_naming(tmp_path):
    spec = feature_spec_for("tacos")
    assert spec.text_pattern == "{qid}" and spec.clip_length == 2.0 and spec.max_v_l <= 0
    assert feature_spec_for("qvhighlights").text_pattern == "qid{qid}"
    assert feature_spec_for("charades").clip_length == 1.0
    _write_text(tmp_path, "s17-d69_0", 3, dim=512)
    assert read_text_features(tmp_path, "s17-d69_0", spec).shape == (3, 512)
    with pytest.raises(DataError, match=r"clip_text_features/qids17-d69_0\.npz"):
        read_text_features(tmp_path, "s17-d69_0", feature_spec_for("qvhighlights"))


def test_tvsum_spec_concatenates_rgb_and_opt(tmp_path):
    spec = feature_spec_for("tvsum", video_dims=[6], text_dim=TX)
    rgb, opt = np.ones((5, 2)), np.arange(20.0).reshape(5, 4)
    (tmp_path / "video_features").mkdir()
    np.save(tmp_path / "video_features" / "x_rgb.npy", rgb)
    np.save(tmp_path / "video_features" / "x_opt.npy", opt)
    video = read_video_features(tmp_path, "x", spec)
    np.testing.assert_allclose(video[:, :6], _hand_norm(np.concatenate([rgb, opt], 1)), atol=1e-6)  # joint norm
    assert feature_spec_for("tvsum").v_feat_dim == 2050 == LDDETRConfig.preset("tvsum").v_feat_dim
    assert feature_spec_for("tvsum", root=tmp_path).video_dims == [6]  # discovered from the files


def test_feature_spec_roundtrip_dims_and_check_config(tmp_path):
    spec = feature_spec_for("qvhighlights")
    assert spec.v_feat_dim == 2818 and spec.t_feat_dim == 512
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    spec.check_config(LDDETRConfig.preset("qvhighlights"))
    feature_spec_for("charades").check_config(LDDETRConfig.preset("charades"))
    feature_spec_for("tacos").check_config(LDDETRConfig.preset("tacos"))
    with pytest.raises(ValueError, match=r"v_feat_dim: features give 2818, config has 514"):
        spec.check_config(LDDETRConfig.preset("qvhighlights", v_feat_dim=514))
    with pytest.raises(ValueError, match=r"clip_length.*2\.0.*1\.0"):
        spec.check_config(LDDETRConfig.preset("charades"))
    with pytest.raises(ValueError, match="unknown FeatureSpec field"):
        FeatureSpec.from_dict({"video_dir": "x"})
    _write_video(tmp_path, "v", 3)
    _write_text(tmp_path, "qid1", 2)
    found = feature_spec_for("qvhighlights", tmp_path)
    assert (found.video_dims, found.text_dim, found.v_feat_dim) == ([SF, CL], TX, SF + CL + 2)


# ---------------------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------------------
def test_qvhighlights_labels_by_hand(qvh_root):
    ds = MomentDataset([QVH_REC], qvh_root, _spec(), dataset="qvhighlights", seed=3)
    item = ds[0]
    assert item["video"].shape == (8, SF + CL + 2) and item["text"].shape == (5, TX)
    assert (item["qid"], item["vid"], item["query"], item["duration"]) == (7, "v1", "a dog runs", 16.0)
    # summed scores 4, 11, 1, 6 at clips 2, 3, 4, 6
    assert item["saliency_all_labels"].tolist() == [0, 0, 4, 11, 1, 0, 6, 0]
    pos, neg = item["saliency_pos_labels"].tolist(), item["saliency_neg_labels"].tolist()
    assert pos[0] == 3 and neg[0] == 4  # highest / lowest summed score
    assert pos[1] in (2, 3, 4, 6) and neg[1] in (0, 1, 5, 7)  # random relevant / random irrelevant
    assert item["saliency_pos_labels"].dtype == torch.long
    # windows [4, 10], [12, 14] s over 8 clips x 2 s: [0.25, 0.625] -> (0.4375, 0.375); [0.75, 0.875] -> (0.8125, 0.125)
    torch.testing.assert_close(item["span_labels"], torch.tensor([[0.4375, 0.375], [0.8125, 0.125]]))


def test_qvhighlights_all_clips_relevant_copies_the_hard_pair(tmp_path):
    _write_video(tmp_path, "v", 3)
    _write_text(tmp_path, "qid1", 2)
    rec = {"qid": 1, "duration": 6, "vid": "v", "relevant_clip_ids": [0, 1, 2],
           "saliency_scores": [[2, 2, 2], [0, 0, 1], [4, 4, 4]], "relevant_windows": [[0, 6]]}
    item = MomentDataset([rec], tmp_path, _spec())[0]
    assert item["saliency_pos_labels"].tolist() == [2, 2] and item["saliency_neg_labels"].tolist() == [1, 1]
    torch.testing.assert_close(item["span_labels"], torch.tensor([[0.5, 1.0]]))


def test_qvhighlights_truncated_video_clamps_indices(tmp_path):
    _write_video(tmp_path, "v", 10)
    _write_text(tmp_path, "qid1", 2)
    rec = {"qid": 1, "duration": 20, "vid": "v", "relevant_clip_ids": [3, 7, 8],
           "saliency_scores": [[0, 0, 0], [1, 1, 1], [4, 4, 4]], "relevant_windows": [[6, 8], [14, 18]]}
    item = MomentDataset([rec], tmp_path, _spec(max_v_l=5))[0]  # 5 clips = 10 s survive
    assert item["saliency_all_labels"].tolist() == [0, 0, 0, 0, 0]  # clip 3 has score 0; 7, 8 are cut off
    assert item["saliency_pos_labels"][0] == 4 and item["saliency_neg_labels"][0] == 3  # clip 8 clamped to T-1
    # [6, 8] / 10 -> (0.7, 0.2); [14, 18] lies past the cut and is dropped
    torch.testing.assert_close(item["span_labels"], torch.tensor([[0.7, 0.2]]))


def test_charades_sub_as_query_labels(tmp_path):
    _write_video(tmp_path, "c", 10)
    _write_text(tmp_path, "qid0", 4)
    rec = {"qid": 0, "query": "q", "duration": 10.0, "vid": "c", "relevant_windows": [[2.5, 6.2]]}
    ds = MomentDataset([rec], tmp_path, _spec(clip_length=1.0, max_v_l=-1), dataset="charades")
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        # clip len = 10/10 = 1: gt_st = int(2.5) = 2, gt_ed = min(int(6.2), 10) - 1 = 5
        pos, neg = item["saliency_pos_labels"].tolist(), item["saliency_neg_labels"].tolist()
        assert len(set(pos)) == 2 and set(pos) <= {2, 3, 4, 5}
        assert len(set(neg)) == 2 and set(neg) <= {0, 1, 6, 7, 8, 9}
        assert item["saliency_all_labels"].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
        torch.testing.assert_close(item["span_labels"], torch.tensor([[0.435, 0.37]]))  # [0.25, 0.62]


def test_sub_as_query_single_clip_and_no_room_for_negatives():
    rng = np.random.default_rng(0)
    pos, neg, lab = saliency_labels_sub_as_query([3.2, 3.9], 10.0, 10, rng)  # gt_st 3, gt_ed max(0, 3-1)=2 -> 2
    assert pos == [2, 2] and lab.tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0] and len(set(neg)) == 2
    pos, neg, lab = saliency_labels_sub_as_query([0.0, 4.0], 4.0, 2, rng)  # both clips are GT: no negative pool
    assert sorted(pos) == [0, 1] and neg == pos and lab.tolist() == [1, 1]


def test_span_labels_max_windows_and_clamp():
    rng = np.random.default_rng(0)
    windows = np.array([[2.0 * i, 2.0 * i + 1] for i in range(7)])
    spans = span_labels_from_windows(windows, ctx_l=8, clip_length=2.0, max_windows=5, rng=rng)
    assert spans.shape == (5, 2)
    expected = {(round((2 * i + 0.5) / 16, 6), round(1 / 16, 6)) for i in range(7)}
    assert {(round(c, 6), round(w, 6)) for c, w in spans.tolist()} <= expected
    spans = span_labels_from_windows(np.array([[12.0, 20.0]]), ctx_l=8, clip_length=2.0, max_windows=5, rng=rng)
    torch.testing.assert_close(spans, torch.tensor([[0.875, 0.25]]))  # [0.75, 1.25] clamped to [0.75, 1]


def test_tvsum_labels(tmp_path):
    (tmp_path / "video_features").mkdir()
    np.save(tmp_path / "video_features" / "t_rgb.npy", np.ones((5, 2)))
    np.save(tmp_path / "video_features" / "t_opt.npy", np.ones((5, 2)))
    _npz(tmp_path / "query_features" / "t.npz", token=np.ones((3, TX)))
    label = [[1, 3], [5, 5], [2, 2], [4, 4], [1, 1]]  # means 2, 5, 2, 4, 1
    rec = {"qid": "t", "query": "q", "duration": 5, "vid": "t", "relevant_windows": None, "label": label}
    spec = feature_spec_for("tvsum", video_dims=[4], text_dim=TX)
    item = MomentDataset([rec], tmp_path, spec, dataset="tvsum")[0]
    assert item["saliency_all_labels"].tolist() == [2, 5, 2, 4, 1]
    assert item["saliency_pos_labels"].tolist() == [1, 3] and item["saliency_neg_labels"].tolist() == [4, 0]
    assert item["span_labels"].shape == (0, 2)


# ---------------------------------------------------------------------------------------------------------
# batching, reproducibility, loader
# ---------------------------------------------------------------------------------------------------------
def _multi_root(tmp_path, lengths=(3, 7, 5), tokens=(2, 6, 1)):
    recs = []
    for i, (t, n) in enumerate(zip(lengths, tokens)):
        _write_video(tmp_path, f"v{i}", t, seed=i)
        _write_text(tmp_path, f"qid{i}", n, seed=10 + i)
        recs.append({"qid": i, "query": f"q{i}", "duration": 2 * t, "vid": f"v{i}", "relevant_clip_ids": [0, t - 1],
                     "saliency_scores": [[1, 1, 1], [2, 2, 2]], "relevant_windows": [[0, 2], [2 * t - 2, 2 * t]]})
    return recs


def test_collate_padding_masks_and_targets(tmp_path):
    recs = _multi_root(tmp_path)
    ds = MomentDataset(recs, tmp_path, _spec())
    items = [ds[i] for i in range(3)]
    batch = collate(items)
    assert batch["video"].shape == (3, 7, SF + CL + 2) and batch["text"].shape == (3, 6, TX)
    assert batch["video_mask"].dtype == torch.bool and batch["text_mask"].dtype == torch.bool
    assert batch["video_mask"].sum(1).tolist() == [3, 7, 5] and batch["text_mask"].sum(1).tolist() == [2, 6, 1]
    assert batch["video_mask"][0].tolist() == [True] * 3 + [False] * 4
    for b, it in enumerate(items):
        torch.testing.assert_close(batch["video"][b, : len(it["video"])], it["video"])
        assert batch["video"][b, len(it["video"]):].abs().sum() == 0
        assert batch["text"][b, len(it["text"]):].abs().sum() == 0
    tg = batch["targets"]
    assert [s.shape for s in tg["span_labels"]] == [(2, 2)] * 3
    assert tg["span_targets"].shape == (3, 2, 2) and tg["span_mask"].all()  # padded to the batch's most
    padded = collate(items, max_windows=5)["targets"]
    assert padded["span_targets"].shape == (3, 5, 2) and padded["span_mask"].sum(1).tolist() == [2, 2, 2]
    torch.testing.assert_close(padded["span_targets"][:, :2], torch.stack(tg["span_labels"]))
    assert padded["span_targets"][:, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="more than the padded width 1"):
        collate(items, max_windows=1)
    assert tg["saliency_pos_labels"].shape == (3, 2) and tg["saliency_pos_labels"].dtype == torch.long
    assert tg["saliency_neg_labels"].shape == (3, 2) and tg["saliency_neg_labels"].dtype == torch.long
    assert tg["saliency_all_labels"].shape == (3, 7) and tg["saliency_all_labels"].dtype == torch.float32
    assert tg["saliency_all_labels"][0].tolist() == [3, 0, 6, 0, 0, 0, 0]  # zero-padded past T=3
    assert batch["meta"] == [{"qid": i, "vid": f"v{i}", "query": f"q{i}", "duration": float(2 * t)}
                             for i, t in enumerate((3, 7, 5))]
    unlabelled = collate([MomentDataset(recs, tmp_path, _spec(), load_labels=False)[i] for i in range(3)])
    assert "targets" not in unlabelled and unlabelled["video"].shape == (3, 7, SF + CL + 2)


def test_labels_reproducible_per_seed_and_epoch(tmp_path):
    recs = _multi_root(tmp_path, lengths=(12,) * 3, tokens=(2,) * 3)
    recs = [dict(r, relevant_clip_ids=list(range(2, 8)), saliency_scores=[[1, 1, 1]] * 6,
                 relevant_windows=[[4, 16]]) for r in recs]

    def picks(seed, epoch):
        ds = MomentDataset(recs, tmp_path, _spec(), seed=seed)
        ds.set_epoch(epoch)
        return [(ds[i]["saliency_pos_labels"][1].item(), ds[i]["saliency_neg_labels"][1].item()) for i in range(3)]

    assert picks(0, 0) == picks(0, 0)
    assert picks(0, 2) == picks(0, 2)
    assert picks(0, 0) != picks(0, 1) or picks(0, 0) != picks(0, 2)
    assert picks(0, 0) != picks(5, 0) or picks(0, 1) != picks(5, 1)


def test_make_loader_seeded_order_and_persistent_workers_see_set_epoch(tmp_path):
    recs = _multi_root(tmp_path, lengths=(12,) * 4, tokens=(2,) * 4)
    recs = [dict(r, relevant_clip_ids=list(range(2, 8)), saliency_scores=[[1, 1, 1]] * 6,
                 relevant_windows=[[4, 16]]) for r in recs]
    ds = MomentDataset(recs, tmp_path, _spec(), seed=1)
    order = lambda loader: [m["qid"] for b in loader for m in b["meta"]]  # noqa: E731
    a = make_loader(ds, 2, shuffle=True, seed=4, device="cpu")
    b = make_loader(ds, 2, shuffle=True, seed=4, device=torch.device("cpu"))
    assert not a.pin_memory and sorted(order(a)) == [0, 1, 2, 3]
    b.sampler.set_epoch(0)
    a.sampler.set_epoch(0)
    assert order(a) == order(b)
    assert order(make_loader(ds, 2, shuffle=False)) == [0, 1, 2, 3]

    loader = make_loader(ds, 4, shuffle=False, num_workers=1, seed=0)
    assert loader.persistent_workers
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        (batch,) = list(loader)
        got = batch["targets"]["saliency_neg_labels"]
        want = torch.stack([ds[i]["saliency_neg_labels"] for i in range(4)])
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------
def test_missing_feature_files_name_every_path_tried(qvh_root):
    ds = MomentDataset([dict(QVH_REC, vid="nope")], qvh_root, _spec())
    with pytest.raises(DataError) as e:
        ds[0]
    msg = str(e.value)
    assert "'nope'" in msg and "slowfast_features/nope.npz" in msg and "slowfast_features/nope.npy" in msg
    ds = MomentDataset([dict(QVH_REC, qid=99)], qvh_root, _spec())
    with pytest.raises(DataError, match=r"qid 99.*clip_text_features/qid99\.npz"):
        ds[0]


def test_corrupt_npz_wrong_dims_and_missing_key(qvh_root):
    path = qvh_root / "clip_features" / "v1.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip file")
    with pytest.raises(DataError, match=r"cannot read .*clip_features/v1\.npz"):
        read_video_features(qvh_root, "v1", _spec())
    _npz(path, features=np.ones((8, 3)))
    with pytest.raises(DataError, match=r"clip_features/v1\.npz.*3 channels, expected 4"):
        read_video_features(qvh_root, "v1", _spec())
    _npz(path, feats=np.ones((8, 4)))
    with pytest.raises(DataError, match=r"v1\.npz has no key 'features' \(keys: \['feats'\]\)"):
        read_video_features(qvh_root, "v1", _spec())
    _npz(qvh_root / "clip_text_features" / "qid7.npz", pooler_output=np.ones(TX))
    with pytest.raises(DataError, match=r"qid7\.npz has no key 'last_hidden_state'"):
        read_text_features(qvh_root, 7, _spec())
    _npz(path, features=np.full((8, 4), np.nan))
    with pytest.raises(DataError, match=r"v1\.npz.*NaN"):
        read_video_features(qvh_root, "v1", _spec())


@pytest.mark.parametrize("window, pattern", [([6, 6], r"empty window \[6, 6\]"),
                                             ([0, 200], r"window \[0, 200\] outside \[0, duration=16\]"),
                                             ([-2, 4], r"window \[-2, 4\] outside")])
def test_bad_windows_name_file_qid_window_duration(tmp_path, window, pattern):
    path = _jsonl(tmp_path / "ann.jsonl", [dict(QVH_REC, relevant_windows=[window])])
    with pytest.raises(DataError, match=rf"ann\.jsonl: qid 7: {pattern}.*16"):
        MomentDataset(load_annotations(path), tmp_path, _spec())
    MomentDataset(load_annotations(path), tmp_path, _spec(), load_labels=False)  # windows unused without labels


def test_annotation_file_errors(tmp_path):
    path = _jsonl(tmp_path / "dup.jsonl", [dict(QVH_REC, qid=q) for q in (1, 2, 1, 3, 2)])
    with pytest.raises(DataError, match=r"dup\.jsonl: 2 duplicate qid\(s\): \[1, 2\]"):
        load_annotations(path)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QVH_REC) + "\n" + '{"qid": 8, "vid": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_annotations(path)
    with pytest.raises(DataError, match="annotation file not found"):
        load_annotations(tmp_path / "none.jsonl")
    path = _jsonl(tmp_path / "test.jsonl", [{"qid": 1, "query": "q", "duration": 150, "vid": "v"}])
    with pytest.raises(DataError, match=r"test\.jsonl: qid 1: no relevant_windows \(labels are needed"):
        MomentDataset(path, tmp_path, _spec())
    with pytest.raises(DataError, match="unknown dataset 'qvh'"):
        MomentDataset([QVH_REC], tmp_path, _spec(), dataset="qvh")


# ---------------------------------------------------------------------------------------------------------
# check CLI
# ---------------------------------------------------------------------------------------------------------
def _run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "engine.data", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_check_cli_clean_then_missing_file(tmp_path):
    root = tmp_path / "syn"
    make_synthetic_dataset(root, **TINY)
    ok = _run_cli("check", "--dataset", "synthetic", "--data-root", str(root), "--quiet")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "9 queries" in ok.stdout and "clean" in ok.stdout
    vid = json.loads((root / "val.jsonl").read_text().splitlines()[1])["vid"]
    (root / "clip_features" / f"{vid}.npz").unlink()
    bad = _run_cli("check", "--dataset", "synthetic", "--data-root", str(root), "--quiet")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "missing video feature files: 1" in bad.stdout and f"{vid}.npy" in bad.stdout


def test_check_cli_unusable_input_exits_2(tmp_path, capsys):
    assert data_main(["check", "--dataset", "synthetic", "--root", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "absent" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert data_main(["check", "--dataset", "qvhighlights", "--root", str(tmp_path), "--ann", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bad.jsonl:1" in err
    assert data_main(["check", "--dataset", "qvhighlights", "--root", str(tmp_path / "x"), "--quiet"]) == 2  # no jsonl


def test_check_dataset_reports_dims_durations_windows(tmp_path):
    _write_video(tmp_path, "v1", 8)
    _write_video(tmp_path, "v2", 5)
    _npz(tmp_path / "clip_features" / "v2.npz", features=np.ones((5, 3)))  # wrong CLIP dim
    _write_text(tmp_path, "qid7", 5)
    _write_text(tmp_path, "qid8", 5)
    recs = [QVH_REC, dict(QVH_REC, qid=8, vid="v2", duration=30, relevant_windows=[[4, 40]])]
    path = _jsonl(tmp_path / "a.jsonl", recs)
    report = check_dataset("qvhighlights", tmp_path, [path], _spec(), progress=False)
    p = report["problems"]
    assert not report["clean"] and report["queries"] == 2 and report["videos"] == 2
    assert p["dim_mismatch"]["count"] == 1 and p["dim_mismatch"]["examples"][0]["got"] == 3
    assert p["duration_mismatch"]["count"] == 1 and p["duration_mismatch"]["examples"][0]["qid"] == 8  # 30 vs 5x2
    assert p["bad_window"]["count"] == 1 and p["missing_text"]["count"] == 0
    assert check_dataset("qvhighlights", tmp_path, [_jsonl(tmp_path / "b.jsonl", [QVH_REC])], _spec(),
                         progress=False)["clean"]


# ---------------------------------------------------------------------------------------------------------
# synthetic generator
# ---------------------------------------------------------------------------------------------------------
def test_synthetic_layout_and_dataset(tmp_path):
    manifest = make_synthetic_dataset(tmp_path, **TINY)
    assert manifest["counts"] == {"train": 6, "val": 3}
    recs = load_annotations(tmp_path / "train.jsonl")
    assert list(recs[0]) == ["qid", "query", "duration", "vid", "relevant_clip_ids", "saliency_scores",
                             "relevant_windows"]
    spec = feature_spec_for("synthetic", tmp_path)
    assert spec.video_dims == [8, 4] and spec.text_dim == 4 and spec.v_feat_dim == 14
    ds = MomentDataset(recs, tmp_path, spec, dataset="synthetic")
    for rec, i in zip(recs, range(len(ds))):
        item = ds[i]
        t = item["video"].shape[0]
        assert 8 <= t <= 12 and rec["duration"] == 2 * t and 4 <= item["text"].shape[0] <= 16
        ids = [c for st, ed in rec["relevant_windows"] for c in range(st // 2, ed // 2)]
        assert rec["relevant_clip_ids"] == ids and len(rec["saliency_scores"]) == len(ids)
        assert all(0 <= s <= 4 for row in rec["saliency_scores"] for s in row)
        w = rec["relevant_windows"]
        assert 1 <= len(w) <= 3 and all(a[1] < b[0] for a, b in zip(w, w[1:]))  # sorted, disjoint, not adjacent
    assert collate([ds[0], ds[1]])["video"].shape[-1] == 14


def test_synthetic_signal_localises_the_windows(tmp_path):
    make_synthetic_dataset(tmp_path, **dict(TINY, n_train=30, text_dim=16, clip_dim=16, n_concepts=8))
    spec = feature_spec_for("synthetic", tmp_path)
    ds = MomentDataset(tmp_path / "train.jsonl", tmp_path, spec, dataset="synthetic", load_labels=False)
    hits = 0
    for i, rec in enumerate(ds.records):
        item = ds[i]
        clip = item["video"][:, 8:24]  # CLIP channels (identity projection of the concept space)
        sim = clip @ item["text"].mean(0)
        hits += int(sim.argmax()) in rec["relevant_clip_ids"]
    assert hits >= 27  # text-clip similarity alone finds a relevant clip for ~every query


def test_synthetic_idempotent_and_detects_half_written_cache(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "s", **TINY)
    probe = root / "slowfast_features" / f"{load_annotations(root / 'train.jsonl')[0]['vid']}.npz"
    first_text = (root / "train.jsonl").read_text()
    os.utime(probe, (1, 1))
    ensure_synthetic_dataset(root, **TINY)
    assert probe.stat().st_mtime == 1  # nothing rewritten
    assert synthetic_is_ready(root, **TINY) and not synthetic_is_ready(root, **dict(TINY, seed=1))
    (root / "manifest.json").unlink()  # as if interrupted before the manifest
    assert not synthetic_is_ready(root, **TINY)
    ensure_synthetic_dataset(root, **TINY)
    assert (root / "manifest.json").is_file() and probe.stat().st_mtime != 1
    assert (root / "train.jsonl").read_text() == first_text  # deterministic
    ensure_synthetic_dataset(root, **dict(TINY, seed=1))
    assert (root / "train.jsonl").read_text() != first_text
    assert not list(root.rglob("*.tmp"))


def test_synthetic_refuses_foreign_folder_and_bad_params(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [QVH_REC])
    with pytest.raises(ValueError, match="not synthetic"):
        make_synthetic_dataset(tmp_path, **TINY)
    with pytest.raises(ValueError, match="max_clips"):
        make_synthetic_dataset(tmp_path / "x", **dict(TINY, max_clips=7))


# ---------------------------------------------------------------------------------------------------------
# real annotation files (annotation parsing only: features are not shipped)
# ---------------------------------------------------------------------------------------------------------
REAL = [("qvhighlights", "qvhighlights/highlight_train_release.jsonl", True),
        ("qvhighlights", "qvhighlights/highlight_val_release.jsonl", True),
        ("qvhighlights", "qvhighlights/highlight_test_with_gt.jsonl", True),
        ("qvhighlights", "qvhighlights/highlight_test_release.jsonl", False),
        ("charades", "charades/charades_sta_train_tvr_format.jsonl", True),
        ("charades", "charades/charades_sta_test_tvr_format.jsonl", True),
        ("tacos", "tacos/train.jsonl", True), ("tacos", "tacos/val.jsonl", True), ("tacos", "tacos/test.jsonl", True),
        ("tvsum", "tvsum/tvsum_train.jsonl", True), ("tvsum", "tvsum/tvsum_val.jsonl", True)]


@pytest.mark.parametrize("dataset, rel, labelled", REAL, ids=[r[1] for r in REAL])
def test_real_annotations_parse(dataset, rel, labelled, tmp_path):
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"{path} not found (the tests read ../shared beside the repository)")
    records = load_annotations(path)
    ds = MomentDataset(records, tmp_path, feature_spec_for(dataset), dataset=dataset, load_labels=labelled)
    assert len(ds) == len(records) > 0
    rec = records[0]
    spec = feature_spec_for(dataset)
    ctx_l = max(1, round(float(rec["duration"]) / spec.clip_length))
    labels = ds.labels(0, ctx_l) if labelled else None
    if labels is not None:
        assert labels["saliency_all_labels"].shape == (ctx_l,) and labels["saliency_pos_labels"].shape == (2,)
        assert ((labels["span_labels"] >= 0) & (labels["span_labels"] <= 1)).all()
