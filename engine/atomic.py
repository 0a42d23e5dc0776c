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


def save_jsonl(records: Iterable[dict], path: str | os.PathLike) -> None:
    """One JSON object per line, atomically."""
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def save_json(obj: Any, path: str | os.PathLike, indent: int = 4) -> None:
    """``obj`` as JSON, atomically."""
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=indent))
