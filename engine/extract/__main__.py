"""``python -m engine.extract --videos V [V ...] --out ROOT --clip MODEL [--slowfast WEIGHTS] [--queries Q.jsonl]``

Videos (files, folders, ``.txt`` lists) -> ``ROOT/{slowfast,clip}_features/{vid}.npz`` (vid = file stem),
queries -> ``ROOT/clip_text_features/qid{qid}.npz``, plus ``ROOT/manifest.json``. Rerunning skips finished
files; ``torchrun --nproc_per_node=N -m engine.extract ...`` shards the videos over N ranks.
Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from .. import distributed as dist
from ..features import DataError
from .clip import CLIPError
from .decode import VideoError
from .pipeline import Extractors, extract_corpus, list_videos, write_manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", nargs="+", default=[], help="video files, folders (recursive) or .txt lists")
    p.add_argument("--out", type=Path, required=True, help="feature root (the layout engine.data reads)")
    p.add_argument("--features", default="slowfast,clip",
                   help="video extractors, comma-separated: slowfast,clip (default) or clip")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32",
                   help="CLIP model: a local folder (save_pretrained) or a name in the local HF cache")
    p.add_argument("--slowfast", type=Path, default=None,
                   help="SlowFast 8x8 R50 weights: PySlowFast SLOWFAST_8x8_R50.pkl (the datasets') or .pyth")
    p.add_argument("--slowfast-test-config", default=None, help=argparse.SUPPRESS)  # tests: random tiny net
    p.add_argument("--queries", type=Path, default=None, help="jsonl with qid and query per line")
    p.add_argument("--clip-length", type=float, default=2.0, help="seconds per feature clip (CLIP: 1 frame each)")
    p.add_argument("--batch-size", type=int, default=8, help="SlowFast clips per forward (CLIP: 8x frames)")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) when present")
    p.add_argument("--skip-bad", action="store_true", help="log unusable videos and go on")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    distributed = dist.init_from_env(device)
    device = dist.local_device(device)
    try:
        if not args.videos and args.queries is None:
            raise DataError("nothing to do: pass --videos and/or --queries")
        videos = list_videos(args.videos) if args.videos else []  # cheap checks before loading models
        kinds = [k.strip() for k in args.features.split(",") if k.strip()]
        ex = Extractors.build(kinds, clip=args.clip, slowfast=args.slowfast, device=device,
                              batch_size=args.batch_size, clip_length=args.clip_length,
                              slowfast_test_config=args.slowfast_test_config)
        summary = extract_corpus(videos, args.out, ex, queries=args.queries, rank=dist.rank(),
                                 world=dist.world_size(), progress=not args.no_progress, skip_bad=args.skip_bad)
        if dist.world_size() > 1:
            print(f"rank {dist.rank()}/{dist.world_size()}: extracted {summary['extracted']}, skipped "
                  f"{summary['skipped']} of its {len(videos[dist.rank()::dist.world_size()])} videos", file=sys.stderr)
        dist.barrier()
        if dist.is_main():
            path = write_manifest(args.out, ex, summary, videos)
            print(json.dumps(summary), file=sys.stderr)
            print(f"wrote features of {summary['videos']} videos to {args.out} ({path.name})", file=sys.stderr)
    except (DataError, VideoError, CLIPError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            dist.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
