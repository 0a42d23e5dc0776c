"""A progress line for the slow export steps (ONNX tracing, the AOTInductor C++ compile, the TensorRT build):
``label ...`` when a step starts, the elapsed seconds every few seconds on a terminal, ``label: done in N s``."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def progress(label: str, quiet: bool = False, every: float = 5.0, stream=None) -> Iterator[None]:
    stream = stream or sys.stderr
    if quiet:
        yield
        return
    start = time.perf_counter()
    tty = hasattr(stream, "isatty") and stream.isatty()
    print(f"{label} ...", file=stream, end="" if tty else "\n", flush=True)
    stop = threading.Event()

    def tick():
        while not stop.wait(every):
            print(f"\r{label} ... {time.perf_counter() - start:.0f} s", file=stream, end="", flush=True)

    thread = threading.Thread(target=tick, daemon=True) if tty else None
    if thread is not None:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        print(f"{chr(13) if tty else ''}{label}: done in {time.perf_counter() - start:.1f} s", file=stream, flush=True)
