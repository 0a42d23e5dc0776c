"""``python -m export``'s format table, argument checks (all before the slow export), precision handling and
progress lines; the TensorRT network / builder-config construction against a stub ``tensorrt`` module
(TensorRT cannot be installed here). The real exports are covered by tests/test_export.py."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import export.backends as backends
import export.onnx_export as onnx_export
from engine import save_checkpoint
from export.__main__ import build_parser, main
from export.formats import FORMATS, UNCAPPED_DEFAULT_LEN, parse_shapes, video_len
from reference import LDDETR, LDDETRConfig


def _cfg(**kw) -> LDDETRConfig:
    return LDDETRConfig.preset("qvhighlights", v_feat_dim=12, t_feat_dim=8, queue_length=8, num_v2t_encoder_layers=1,
                               num_encoder1_layers=1, num_encoder2_layers=1, num_convolutional_blocks=1,
                               dim_feedforward=64, **kw)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    capped = save_checkpoint(LDDETR(_cfg()), root / "capped.pt")
    uncapped = save_checkpoint(LDDETR(_cfg(max_v_l=-1, clip_length=1.0)), root / "uncapped.pt")
    return capped, uncapped


@pytest.fixture
def fake_export(monkeypatch):
    """export_onnx / build_trt_engine replaced by recorders that write a small file."""
    calls = []

    def export_onnx(prepared, out, **kw):
        calls.append(("onnx", kw))
        Path(out).write_bytes(b"onnx")
        return Path(out)

    def build_trt_engine(onnx_path, out, **kw):
        calls.append(("trt", kw))
        Path(out).write_bytes(b"engine")
        return Path(out)

    monkeypatch.setattr(onnx_export, "export_onnx", export_onnx)
    monkeypatch.setattr(backends, "build_trt_engine", build_trt_engine)
    monkeypatch.setattr(backends, "require_tensorrt", lambda: types.SimpleNamespace())
    return calls


def test_the_table_drives_subcommands_and_options():
    sub = next(a for a in build_parser()._actions if a.dest == "format")
    assert list(sub.choices) == list(FORMATS)
    for name, fmt in FORMATS.items():
        opts = {s for a in sub.choices[name]._actions for s in a.option_strings}
        dtype = next(a for a in sub.choices[name]._actions if a.dest == "dtype" and a.choices)
        assert tuple(dtype.choices) == fmt.dtypes
        assert ("--shapes" in opts) == ("shapes" in fmt.options) and ("--simplify" in opts) == ("simplify" in fmt.options)


@pytest.mark.parametrize("shapes, text", [
    ("1x2/1x75", "expected BxT/BxT/BxT"), ("1x2/1xa/32x75", "expected BxT/BxT/BxT"),
    ("1x2/1x75/32x90", "video lengths must be in [2, 75]"), ("4x2/1x75/32x75", "need min <= opt <= max"),
    ("1x40/1x20/32x75", "need min <= opt <= max"), ("0x2/1x75/32x75", "batch sizes must be >= 1"),
])
def test_trt_shapes_are_validated_before_exporting(ckpts, fake_export, shapes, text, capsys):
    assert main(["trt", str(ckpts[0]), "--shapes", shapes]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"export trt: error: --shapes {shapes!r}: ") and text in err and len(err.splitlines()) == 1
    assert fake_export == []
    assert parse_shapes("1x2/4x40/32x75", 75) == ((1, 2), (4, 40), (32, 75))


@pytest.mark.parametrize("flags", [["--dtype", "fp16"], ["--fp16"]])
def test_trt_fp16_exports_a_half_onnx_and_builds_that_precision(ckpts, fake_export, flags, tmp_path, capsys):
    out = tmp_path / "m.engine"
    assert main(["trt", str(ckpts[0]), "--out", str(out), *flags]) == 0
    (k1, onnx_kw), (k2, trt_kw) = fake_export
    assert (k1, k2) == ("onnx", "trt") and onnx_kw["dtype"] == "fp16" and trt_kw["precision"] == "fp16"
    assert trt_kw["shapes"]["video"] == ((1, 2, 12), (1, 75, 12), (32, 75, 12))
    err = capsys.readouterr().err  # one progress line per slow step
    assert "ONNX export for TensorRT (fp16 graph) ..." in err and "TensorRT engine build: done in" in err


def test_unwritable_out_is_refused_before_the_export(ckpts, fake_export, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["onnx", str(ckpts[0]), "--out", str(tmp_path / "f" / "m.onnx")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and fake_export == []


def test_uncapped_model_exports_past_75_clips(ckpts, fake_export, tmp_path, capsys):
    capped, uncapped = ckpts
    assert main(["onnx", str(uncapped), "--out", str(tmp_path / "u.onnx"), "--max-video-len", "400"]) == 0
    assert fake_export[-1][1]["max_video_len"] == 400
    assert "videos up to 400 clips" in capsys.readouterr().out
    assert video_len(_cfg(max_v_l=-1), None) == UNCAPPED_DEFAULT_LEN and video_len(_cfg(max_v_l=40), None) == 40
    assert main(["onnx", str(capped), "--max-video-len", "400"]) == 2
    assert "exceeds the model's max video length 75" in capsys.readouterr().err
    assert main(["trt", str(uncapped), "--out", str(tmp_path / "u.engine")]) == 0  # profile up to the export's max
    assert fake_export[-1][1]["shapes"]["video_mask"][2] == (32, UNCAPPED_DEFAULT_LEN)


def test_precision_and_device_come_from_the_table(ckpts, fake_export, capsys):
    with pytest.raises(SystemExit) as e:
        main(["onnx", str(ckpts[0]), "--dtype", "bf16"])
    assert e.value.code == 2 and "--dtype: invalid choice: 'bf16'" in capsys.readouterr().err
    assert main(["onnx", str(ckpts[0]), "--bf16"]) == 2  # the hidden old spelling is checked by the same table
    assert "export onnx: error: --dtype bf16: onnx supports fp32, fp16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["onnx", str(ckpts[0]), "--device", "cuda"])
    assert "--device: invalid choice: 'cuda' (choose from 'cpu')" in capsys.readouterr().err


def test_onnx_progress_line(ckpts, fake_export, tmp_path, capsys):
    assert main(["onnx", str(ckpts[0]), "--out", str(tmp_path / "m.onnx"), "--half"]) == 0
    assert fake_export[-1][1]["dtype"] == "fp16"
    err = capsys.readouterr().err
    assert "ONNX export (torch.onnx.export, dynamo) ..." in err and "ONNX export (torch.onnx.export, dynamo): done in" in err
    assert main(["onnx", str(ckpts[0]), "--out", str(tmp_path / "q.onnx"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


# ---- TensorRT network / config construction, against a stub module -------------------------------------
class _Recorder:
    def __init__(self, log, name):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        def call(*args):
            self._log.append((f"{self._name}.{attr}", args))
            return {"create_network": _Recorder(self._log, "network"),
                    "create_builder_config": _Recorder(self._log, "config"),
                    "create_optimization_profile": _Recorder(self._log, "profile"),
                    "build_serialized_network": b"serialized-engine", "parse_from_file": True}.get(attr)
        return call


def _stub_trt(log, version="10.3.0", strongly_typed=True):
    flag_cls = types.SimpleNamespace(**({"STRONGLY_TYPED": 1} if strongly_typed else {}))
    return types.SimpleNamespace(
        __version__=version, Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=lambda logger: _Recorder(log, "builder"), OnnxParser=lambda net, logger: _Recorder(log, "parser"),
        NetworkDefinitionCreationFlag=flag_cls, MemoryPoolType=types.SimpleNamespace(WORKSPACE="ws"),
        BuilderFlag=types.SimpleNamespace(FP16="FP16", BF16="BF16"))


SHAPES = {"video": ((1, 2, 12), (1, 75, 12), (32, 75, 12)), "video_mask": ((1, 2), (1, 75), (32, 75))}


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_trt_network_is_strongly_typed_and_takes_the_graphs_precision(tmp_path, version, precision):
    log = []
    out = backends.build_trt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision=precision,
                                    workspace_gb=2.0, shapes=SHAPES, trt=_stub_trt(log, version))
    assert out.read_bytes() == b"serialized-engine" and not list(tmp_path.glob(".*tmp"))
    assert ("builder.create_network", (1 << 1,)) in log  # STRONGLY_TYPED: the ONNX graph's types decide
    assert not [c for c in log if c[0] == "config.set_flag"]  # no FP16/BF16 flag over a typed graph
    assert ("config.set_memory_pool_limit", ("ws", 2 << 30)) in log
    assert ("profile.set_shape", ("video", *SHAPES["video"])) in log
    assert ("parser.parse_from_file", (str(tmp_path / "m.onnx"),)) in log


def test_trt_without_strong_typing_sets_the_half_flag(tmp_path):
    log = []
    backends.build_trt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision="fp16", shapes=SHAPES,
                              trt=_stub_trt(log, "8.6.1", strongly_typed=False))
    assert ("builder.create_network", (0,)) in log and ("config.set_flag", ("FP16",)) in log
