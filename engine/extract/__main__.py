"""``python -m engine.extract --videos V [V ...] --out ROOT --clip MODEL [--slowfast WEIGHTS] [--queries Q.jsonl]``

Videos (files, folders, ``.txt`` lists) -> ``ROOT/{slowfast,clip}_features/{vid}.npz`` (vid = file stem),
queries -> ``ROOT/clip_text_features/qid{qid}.npz``, plus ``ROOT/manifest.json``. Rerunning skips finished
files; ``torchrun --nproc_per_node=N -m engine.extract ...`` shards the videos over N ranks.
``--device`` and ``--out`` are checked (``engine.cli``) before any video is listed or opened, any model loaded
or process group started. Exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .. import cli
from .. import distributed as dist
from ..features import DataError
from .pipeline import Extractors, extract_corpus, list_videos, write_manifest

DESCRIPTION = """Raw videos (files, folders, .txt lists) -> the feature layout engine.data and engine.train read:
ROOT/{slowfast,clip}_features/{vid}.npz (vid = the file stem), the queries' ROOT/clip_text_features/qid{qid}.npz,
and ROOT/manifest.json. A rerun skips the files that exist; torchrun --nproc_per_node=N -m engine.extract shards
the videos over N ranks (one device each)."""
EXAMPLE = ("python -m engine.extract --videos videos/ --out features/ --queries queries.jsonl "
           "--clip ./clip-vit-base-patch32 --slowfast SLOWFAST_8x8_R50.pkl")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m engine.extract", DESCRIPTION, EXAMPLE)
    p.add_argument("--videos", nargs="+", default=None, metavar="V", help="video files, folders (recursive) or .txt lists")
    p.add_argument("--out", type=Path, required=True, metavar="ROOT",
                   help="a folder: the feature root written (the layout engine.data reads)")
    p.add_argument("--features", default="slowfast,clip", metavar="KINDS",
                   help="video extractors, comma-separated: slowfast,clip (default) or clip")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32", metavar="MODEL",
                   help="CLIP model: a local folder (save_pretrained) or a name in the local HF cache")
    p.add_argument("--slowfast", type=Path, default=None, metavar="WEIGHTS",
                   help="SlowFast 8x8 R50 weights: PySlowFast SLOWFAST_8x8_R50.pkl (the datasets') or .pyth")
    p.add_argument("--slowfast-test-config", default=None, help=argparse.SUPPRESS)  # tests: random tiny net
    p.add_argument("--queries", type=Path, default=None, metavar="FILE", help="a jsonl with qid and query per line")
    p.add_argument("--clip-length", type=cli.positive_float, default=2.0, metavar="SECONDS",
                   help="seconds per feature clip (CLIP: 1 frame each)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, metavar="N",
                   help="SlowFast clips per forward (CLIP: 8x as many frames)")
    cli.add_device(p, default_help="cuda if available, else cpu; cuda:LOCAL_RANK under torchrun")
    p.add_argument("--skip-bad", action="store_true", help="log unusable videos and go on")
    cli.add_quiet(p, "--no-progress")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # before any video is listed or opened, any model loaded or process group started
        device = cli.resolve_device(args.device)
        cli.check_writable(args.out, is_dir=True)
        if not args.videos and args.queries is None:
            raise DataError("nothing to do: pass --videos and/or --queries")
    except ValueError as e:
        return cli.fail(e)
    distributed = False
    try:
        distributed = dist.init_from_env(device)
        device = dist.local_device(device)
        videos = list_videos(args.videos) if args.videos else []  # cheap checks before loading models
        kinds = [k.strip() for k in args.features.split(",") if k.strip()]
        ex = Extractors.build(kinds, clip=args.clip, slowfast=args.slowfast, device=device,
                              batch_size=args.batch_size, clip_length=args.clip_length,
                              slowfast_test_config=args.slowfast_test_config)
        summary = extract_corpus(videos, args.out, ex, queries=args.queries, rank=dist.rank(),
                                 world=dist.world_size(), progress=not args.quiet, skip_bad=args.skip_bad)
        if dist.world_size() > 1:
            print(f"rank {dist.rank()}/{dist.world_size()}: extracted {summary['extracted']}, skipped "
                  f"{summary['skipped']} of its {len(videos[dist.rank()::dist.world_size()])} videos", file=sys.stderr)
        dist.barrier()
        if dist.is_main():
            path = write_manifest(args.out, ex, summary, videos)
            print(json.dumps(summary), file=sys.stderr)
            if not args.quiet:
                print(f"wrote features of {summary['videos']} videos to {args.out} ({path.name})", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: the finished files are kept; rerun the same command to resume", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    except OSError as e:
        return cli.fail(cli.os_error_line(e))
    except ValueError as e:  # DataError, VideoError, CLIPError, SlowFastError: one line naming the file
        return cli.fail(e)
    finally:
        if distributed:
            dist.cleanup()
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
