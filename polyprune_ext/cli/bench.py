"""polyprune bench: latency and FPS of a checkpoint (or an unpruned model), real-time or not."""

import argparse
import time

from .. import speed
from ..models import smp_model
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency and FPS, and whether the model is real-time")
    p.add_argument("--checkpoint", type=options.checkpoint_folder,
                   help="folder written by train, prune or sparsify (default: an unpruned "
                        "--arch/--encoder model)")
    p.add_argument("--arch", default="Unet", help="smp architecture without --checkpoint (default %(default)s)")
    p.add_argument("--encoder", default="resnet34", help="smp encoder without --checkpoint (default %(default)s)")
    p.add_argument("--size", type=options.input_size, default=352,
                   help="input side in pixels (default %(default)s, where real-time is judged)")
    p.add_argument("--batch-size", type=options.positive_int, default=8,
                   help="the larger batch timed beside batch 1 (default %(default)s)")
    p.add_argument("--threads", type=options.positive_int, default=None,
                   help="torch threads to pin while timing (default: torch's, one per core)")
    p.add_argument("--warmup", type=options.count, default=5,
                   help="untimed runs first (default %(default)s)")
    options.add_device(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    model = options.load_checkpoint(args) if args.checkpoint else smp_model(args.arch, args.encoder)
    options.say(f"{args.warmup} warm-up runs, then runs in chunks of 10 until the median moves by "
                "less than 2% (at most 200); median, p10 and p90 in ms")
    rows = []
    for batch in dict.fromkeys((1, args.batch_size)):  # a line per batch size: bench takes minutes
        start = time.perf_counter()
        timed = speed.speed_table(model, size=args.size, batches=(batch,), device=args.device,
                                  threads=args.threads, warmup=args.warmup)
        options.say(f"batch {batch}: {len(timed)} settings timed in {time.perf_counter() - start:.0f} s")
        rows += timed
    print(speed.format_table(rows))
    verdict = "real-time" if speed.is_real_time(rows, size=args.size) else "not real-time"
    print(f"\n{verdict} on {args.device} (>= {speed.REAL_TIME_FPS} FPS at batch 1, {args.size}x{args.size})")
