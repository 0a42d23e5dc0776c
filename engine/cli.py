"""What every command line shares: one vocabulary, exit codes, the precision table, hidden aliases.

Vocabulary (README "Command-line vocabulary"): ``--ckpt`` (export: positional ``CKPT``), ``--data-root``,
``--ann``, ``--split``, ``--max-video-len``, ``--dtype fp32|bf16|fp16``, ``--out``, ``--quiet``,
``--device``. Old spellings stay accepted as hidden aliases (:data:`ALIASES`; they never show in
``--help``). Exit codes: :data:`EXIT_OK` 0, :data:`EXIT_FAILED` 1 (a check / verification failed),
:data:`EXIT_BAD_INPUT` 2 (bad input: one line on stderr, no traceback), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import torch

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

#: the one precision table: CLI name -> torch dtype (``--dtype``; ``Predictor(dtype=)``; export)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: old spelling -> the one name (the README's migration note lists these)
ALIASES: dict[str, str] = {
    "--gt": "--ann",
    "--root": "--data-root",
    "--max-v-l": "--max-video-len",
    "--amp": "--dtype",
    "--half": "--dtype fp16",
    "--fp16": "--dtype fp16",
    "--bf16": "--dtype bf16",
    "--json": "--out",
    "--no-progress": "--quiet",
}


def to_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or a torch dtype among them) -> the torch dtype; ValueError otherwise."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {value}")
        return value
    key = {"off": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(
        str(value).lower(), str(value).lower())
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {value!r}")
    return DTYPES[key]


def dtype_name(value: str | torch.dtype) -> str:
    """The CLI name (``"fp32"`` ...) of a dtype or of any accepted spelling."""
    dt = to_dtype(value)
    return next(k for k, v in DTYPES.items() if v == dt)


def dtype_arg(value: str) -> str:
    """argparse ``type=`` for ``--dtype`` (and the hidden ``--amp off|bf16|fp16``)."""
    try:
        return dtype_name(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(DTYPES)})") from None


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}") from None
    if not (x > 0 and x != float("inf")):  # NaN fails the comparison
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value!r}")
    return x


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Hidden aliases left out of ``--help``; each default shown once (appended unless the help says it)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        strings = [s for s in action.option_strings if s not in ALIASES]
        if not strings or not action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return ", ".join(strings)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{s} {metavar}" for s in strings)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ... (see --help)``, exit 2) that name the flag's one
    spelling, never a hidden alias."""

    def error(self, message: str):
        for alias in ALIASES:
            message = message.replace(f"/{alias}", "")
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    """A :class:`Parser` with the shared formatter and an example epilog."""
    return Parser(prog=prog, description=textwrap.fill(" ".join(description.split()), 100), formatter_class=HelpFormatter,
                  epilog=f"example:\n  {example}\n\nexit codes: 0 ok, 1 check/verify failed, 2 bad input")


def add_quiet(p: argparse.ArgumentParser | Any, *aliases: str) -> None:
    """``--quiet``; ``aliases``: old spellings of it, hidden (each must be in :data:`ALIASES`)."""
    assert all(ALIASES.get(a) == "--quiet" for a in aliases), aliases  # a programming error, not user input
    p.add_argument("--quiet", *aliases, dest="quiet", action="store_true", help="no progress bars or notes")


#: what the ``--device`` help of a command that runs no model says (tests/test_cli_vocabulary.py looks for it)
RUNS_NO_MODEL = "this command runs no model"


def add_device(p: argparse.ArgumentParser | Any, default_help: str = "cuda if available, else cpu",
               note: str | None = None) -> None:
    """``--device``. ``note`` marks a command that runs no model (``evaluate``, ``data check|synth``): its
    help says so — ``note`` names the work, which stays on the CPU — and the command only passes the name
    through :func:`resolve_device` before it starts (``--device cuda`` without CUDA: the same one-line
    error, exit 2, as everywhere)."""
    if note is None:
        text = f"cpu, cuda, cuda:1 (default: {default_help})"
    else:
        text = f"cpu, cuda, cuda:1; checked only: {RUNS_NO_MODEL}, so {note} on the CPU whatever the device"
    p.add_argument("--device", default=None, help=text)


def resolve_device(name: str | None) -> torch.device:
    """``--device`` -> torch.device; ValueError (one line) for a malformed name or CUDA that is not there."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch sees no GPU); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def check_writable(path: str | os.PathLike, is_dir: bool = False) -> None:
    """ValueError when ``path`` (a file to write, or a folder with ``is_dir``) cannot be written — checked
    before a long job, so a typo in ``--out`` does not cost the job."""
    path = Path(path)
    folder = path if is_dir else path.parent
    probe = folder
    while not probe.exists():  # the nearest existing ancestor must let us create the rest
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"--out {path}: {probe} is a file, not a folder")
    if is_dir and path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; it must be a folder")
    if not is_dir and path.is_dir():
        raise ValueError(f"--out {path} is a folder; it must be a file name")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {probe} is not writable")


def os_error_line(e: OSError) -> str:
    """One line for an OSError: disk full / permission / missing file, naming the file."""
    name = e.filename or ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device writing {name}".rstrip()
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied: {name}"
    if isinstance(e, FileNotFoundError):
        return f"file not found: {name}"
    return f"{e.strerror or type(e).__name__}: {name}".rstrip(": ")


def fail(message: Any, prog: str | None = None, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``error: <first line>`` on stderr and return ``code``."""
    text = " ".join(str(message).split()) if "\n" not in str(message).strip() else str(message).strip().splitlines()[0]
    print(f"{prog + ': ' if prog else ''}error: {text}", file=sys.stderr)
    return code


def root_cause(e: BaseException) -> BaseException:
    """The exception a DataLoader worker raised (torch re-raises it wrapped, with the text only)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or (e.__context__ if not e.__suppress_context__ else None)
        if nxt is None:
            break
        e = nxt
    return e


def worker_error_line(e: BaseException) -> str | None:
    """The original message of a DataLoader worker error (``Caught DataError in DataLoader worker ...``)."""
    text = str(e)
    if "in DataLoader worker process" not in text:
        return None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text


def argv_list(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
