"""polyprune bench: latency and FPS of a checkpoint (or an unpruned model), real-time or not."""

import argparse

from .. import speed
from ..models import named_model
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency and FPS, and whether the model is real-time")
    p.add_argument("--checkpoint", help="directory written by train or prune (default: an "
                                        "unpruned --arch/--encoder model)")
    options.add_arch(p, when=", without --checkpoint")
    p.add_argument("--size", type=int, default=352, help="input side in pixels (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="the larger batch timed beside batch 1 (default %(default)s)")
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    model = options.load_checkpoint(args.checkpoint)[0] if args.checkpoint else \
        named_model(args.arch, args.encoder, **args.model_args)
    rows = speed.speed_table(model, size=args.size, batches=(1, args.batch_size), device=args.device)
    print(speed.format_table(rows))
    verdict = "real-time" if speed.is_real_time(rows, size=args.size) else "not real-time"
    print(f"\n{verdict} on {args.device} (>= {speed.REAL_TIME_FPS} FPS at batch 1, {args.size}x{args.size})")
