"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``.

An interrupted write (crash, Ctrl-C, full disk) never leaves a half-written checkpoint, prediction or
metrics file behind: either the old file is still there, or the complete new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(path, "wb") as f: ...`` writes ``path`` all at once, or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a killed :func:`atomic_open` left in ``folder`` (``kill -9`` skips
    its cleanup); call it when a job starts writing there. Returns the removed paths."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def save_jsonl(records: Iterable[dict], path: str | os.PathLike) -> None:
    """One JSON object per line, atomically. A NaN/inf value (a diverged model) is refused — bare ``NaN`` is
    not JSON — with a ValueError naming the record's qid; nothing is written then."""
    with atomic_open(path) as f:
        for i, r in enumerate(records):
            try:
                f.write(json.dumps(r, allow_nan=False) + "\n")
            except ValueError:
                qid = r.get("qid", i) if isinstance(r, dict) else i
                raise ValueError(f"{path}: record qid {qid!r} has NaN/inf values (a diverged model?); "
                                 f"nothing was written") from None


def save_json(obj: Any, path: str | os.PathLike, indent: int | None = 4) -> None:
    """``obj`` as JSON, atomically."""
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=indent))
