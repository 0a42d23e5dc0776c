"""Every command line speaks one vocabulary (README "Command-line vocabulary"): this walks every CLI's
``--help`` and checks the table — one name per concept, old spellings hidden but accepted, ``--quiet`` and
``--device`` on every command (a command that runs no model says so in its ``--device`` help), ``--out`` saying
file or folder, choices listed, each default shown once, an
example epilog, no references to spec files a user does not have."""

from __future__ import annotations

import argparse
import re

import pytest

from engine.cli import ALIASES, RUNS_NO_MODEL

#: command -> (parser factory, sub-command or None)
def _parsers():
    import engine.data
    import engine.evaluate
    import engine.extract.__main__ as extract_main
    import engine.extract.slowfast_convert as slowfast_convert
    import engine.predict
    import engine.train
    import export.__main__ as export_main

    def sub(factory, name):
        p = factory()
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]

    return {
        "engine.data": engine.data.build_parser(),
        "export": export_main.build_parser(),
        "engine.evaluate": engine.evaluate.build_parser(),
        "engine.data check": sub(engine.data.build_parser, "check"),
        "engine.data synth": sub(engine.data.build_parser, "synth"),
        "engine.train": engine.train.build_parser(),
        "engine.predict": engine.predict.build_parser(),
        "engine.extract": extract_main.build_parser(),
        "engine.extract.slowfast_convert": slowfast_convert.build_parser(),
        **{f"export {f}": sub(export_main.build_parser, f) for f in ("onnx", "trt", "aoti")},
    }


PARSERS = _parsers()
TOP_LEVEL = {"engine.data", "export"}  # they only dispatch to their sub-commands
COMMANDS = [c for c in PARSERS if c not in TOP_LEVEL]
RUNS_A_MODEL = {"engine.train", "engine.predict", "engine.extract", "export onnx", "export trt", "export aoti"}
#: concept -> the one flag, and the commands that have the concept
VOCABULARY = {
    "--ckpt": {"engine.predict"},  # export takes a positional CKPT; train's --resume resumes state
    "--data-root": {"engine.data check", "engine.train", "engine.predict", "export onnx", "export trt", "export aoti"},
    "--ann": {"engine.evaluate", "engine.data check", "engine.predict", "export onnx", "export trt", "export aoti"},
    "--split": {"engine.predict", "export onnx", "export trt", "export aoti"},
    "--max-video-len": {"engine.data check", "export onnx", "export trt", "export aoti"},
    "--dtype": {"engine.train", "engine.predict", "export onnx", "export trt", "export aoti"},
    "--out": set(COMMANDS),
    "--quiet": set(COMMANDS),
    "--device": set(COMMANDS),
}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command", list(PARSERS))
def test_help_is_self_contained(command):
    text = PARSERS[command].format_help()
    assert "example:\n  python -m " in text, "an example epilog"
    assert "exit codes: 0" in text
    assert not re.search(r"spec/|\.md\b|§|ld-detr-code|evaluation\.md", text), "no references to spec files"
    for old in ALIASES:
        assert not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", text), f"{old} is a hidden alias"


@pytest.mark.parametrize("command", list(PARSERS))
def test_second_spellings_are_hidden_aliases(command):
    """One name per flag: any other spelling of it is an old one, in ALIASES (so hidden from --help)."""
    for action in PARSERS[command]._actions:
        if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x: one switch
            continue
        shown = [s for s in action.option_strings if s.startswith("--") and s != "--help" and s not in ALIASES]
        assert len(shown) <= 1, (command, action.option_strings)


@pytest.mark.parametrize("command", list(PARSERS))
def test_each_default_shown_once_and_choices_listed(command):
    parser = PARSERS[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        help_text = formatter._expand_help(action) if action.help else ""
        assert help_text.count("default") <= 1, (action.option_strings, help_text)
        if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
            shown = formatter._format_action_invocation(action) + " " + help_text
            assert all(str(c) in shown for c in action.choices), (action.option_strings, shown)


@pytest.mark.parametrize("flag", list(VOCABULARY))
def test_one_name_per_concept(flag):
    have = {c for c, p in PARSERS.items() if flag in _options(p)}
    assert VOCABULARY[flag] <= have, f"{flag} missing from {sorted(VOCABULARY[flag] - have)}"


@pytest.mark.parametrize("command", COMMANDS)
def test_device_never_silent(command):
    """Every command takes ``--device``; one that runs no model says so, and that its work stays on the CPU,
    in the ``--help`` a user reads (one that runs a model does not)."""
    parser = PARSERS[command]
    assert "--device" in _options(parser), f"{command} has no --device"
    device_help = " ".join(parser._get_formatter()._expand_help(_options(parser)["--device"]).split())
    assert device_help in " ".join(parser.format_help().split()), "shown in --help"
    if command in RUNS_A_MODEL:
        assert RUNS_NO_MODEL not in device_help, command
    else:
        assert RUNS_NO_MODEL in device_help and "on the CPU" in device_help, \
            f"{command}: --device help must say it runs no model and stays on the CPU"


def test_out_says_file_or_folder():
    for command in COMMANDS:
        help_text = _options(PARSERS[command])["--out"].help
        assert re.match(r"an? (file|folder)", help_text), (command, help_text)


def test_choices_are_listed_for_preset_dataset_dtype():
    train = _options(PARSERS["engine.train"])
    assert {"qvhighlights", "charades", "tacos", "tvsum"} <= set(train["--preset"].choices)
    assert set(train["--dataset"].choices) >= {"qvhighlights", "synthetic"}
    for command in ("engine.train", "engine.predict"):
        assert "{fp32,bf16,fp16}" in PARSERS[command].format_help()


@pytest.mark.parametrize("command, old, new, value", [
    ("engine.evaluate", "--gt", "--ann", "g.jsonl"),
    ("engine.data check", "--root", "--data-root", "feats"),
    ("engine.data check", "--max-v-l", "--max-video-len", "50"),
    ("engine.data check", "--json", "--out", "r.json"),
    ("engine.train", "--amp", "--dtype", "bf16"),
    ("export onnx", "--max-v-l", "--max-video-len", "40"),
    ("engine.extract", "--no-progress", "--quiet", None),
])
def test_old_spellings_still_parse(command, old, new, value):
    parser = PARSERS[command]
    required = {"engine.evaluate": ["--submission", "s.jsonl", "--ann", "x"],
                "engine.data check": ["--dataset", "qvhighlights", "--data-root", "x"],
                "engine.extract": ["--out", "feats"],
                "export onnx": ["ckpt.pt"]}.get(command, [])
    dest = _options(parser)[new].dest
    given = [] if value is None else [value]
    assert getattr(parser.parse_args(required + [old, *given]), dest) == getattr(parser.parse_args(required + [new, *given]), dest)
    if value is None:  # a switch: the old spelling turns it on
        assert getattr(parser.parse_args(required + [old]), dest) is True


def test_slowfast_convert_positional_out_still_parses():
    """``slowfast_convert PKL OUT`` (the old form) == ``PKL --out OUT``; OUT is hidden from ``--help``."""
    from engine.extract.slowfast_convert import output_path

    parser = PARSERS["engine.extract.slowfast_convert"]
    old, new = parser.parse_args(["w.pkl", "w.safetensors"]), parser.parse_args(["w.pkl", "--out", "w.safetensors"])
    assert output_path(old) == output_path(new) == "w.safetensors"
    assert output_path(parser.parse_args(["dir/SLOWFAST_8x8_R50.pkl"])) == "dir/SLOWFAST_8x8_R50.safetensors"
    text = parser.format_help()
    positionals = text.split("positional arguments:\n")[1].split("\n\n")[0]
    assert re.findall(r"^  (\S+)", positionals, re.M) == ["PKL"], "the old positional OUT is hidden"
    assert parser.format_usage().rstrip().endswith(" PKL"), parser.format_usage()


@pytest.mark.parametrize("alias, dtype", [("--half", "fp16"), ("--fp16", "fp16"), ("--bf16", "bf16")])
def test_export_precision_aliases(alias, dtype):
    parser = PARSERS["export trt"]
    assert parser.parse_args(["ckpt.pt", alias]).dtype == dtype


def test_bad_flag_errors_are_one_line_naming_the_one_spelling(capsys):
    with pytest.raises(SystemExit) as e:
        PARSERS["engine.train"].parse_args(["--amp", "fp8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "argument --dtype:" in err and "--amp" not in err
