"""polyprune sweep: magnitude pruning at each compression ratio, layer-wise and network-wide,
fine-tuned at every point; table, plot, report (Mahbod et al. 2022)."""

import argparse
import sys
import time
from pathlib import Path

from .. import choices
from ..choices import Scope
from ..engine import compression_sweep, seed_everything
from ..engine import report, sweep
from .. import _io
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="magnitude pruning at each compression ratio, layer-wise "
                                     "and network-wide, fine-tuned; table, plot, report")
    options.add_checkpoint(p, "train")
    options.add_out(p, "the log, plot, report and points", resume_needs=("sweep.json",))
    p.add_argument("--crs", type=options.compression_ratio, nargs="+", default=list(sweep.CRS),
                   help="compression ratios: prunable weights / remaining weights (default %(default)s)")
    p.add_argument("--scopes", nargs="+", choices=choices.names(Scope), default=["layer", "global"],
                   help="layer-wise, network-wide or both (default %(default)s)")
    options.add_recalibration(p)
    options.add_finetuning(p, epochs=2)
    p.add_argument("--one-shot", action="store_true",
                   help="prune the trained model afresh at each CR (default: gradually)")
    p.add_argument("--keep-first", action="store_true", help="leave the first conv of each network dense")
    p.add_argument("--keep-last", action="store_true", help="leave the last conv of each network dense")
    p.add_argument("--biases", action="store_true", help="prune conv biases too")
    options.add_task(p, from_checkpoint=True)
    options.add_data(p, size="the checkpoint's")
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    plan = options.checkpoint_plan(args)
    task = options.resolve_task(args, plan)
    out = Path(args.out)
    rows = options.read_rows(out / "sweep.json") if args.resume else None
    data = options.datasets(task, args)
    model = options.load_checkpoint(args)
    trainer = options.trainer_for(task, args, model, None, data, plan=plan)
    if rows:
        options.say(f"resuming after {len(rows)} points")

    def on_row(rows: list) -> None:
        report.write_rows(rows, out, "sweep")
        row = rows[-1]
        options.say(f"{sweep.SCOPE_NAMES[row['scope']]} CR {row['cr']:g}: "
                    + ", ".join(f"{m.key} {row[m.key]:.4f}" for m in task.reported if m.key in row))

    start = time.time()
    rows = compression_sweep(
        trainer, crs=args.crs, scopes=args.scopes, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, gradual=not args.one_shot, first=not args.keep_first,
        last=not args.keep_last, biases=args.biases, bn_recal_images=args.bn_recal_images,
        out_dir=out / "points", rows=rows, on_row=on_row)
    plotted = sweep.plot_sweep(rows, task.reported, out / "sweep.png")
    size = args.size
    text = ["# Magnitude pruning sweep: layer-wise against network-wide", "",
            f"- command: `polyprune {' '.join(sys.argv[1:])}`",
            f"- data: {args.data}, {size}x{size}; {args.finetune_epochs} fine-tuning epochs "
            f"per point at lr {args.finetune_lr:g}, {'one-shot' if args.one_shot else 'gradual'}; "
            f"{time.time() - start:.0f} s",
            "", sweep.sweep_table(rows, task.reported), "",
            *sweep.crossing_summary(rows, task.reported), ""]
    _io.write_text(out / "sweep.md", "\n".join(text))
    print("\n".join(text[4:]))
    print(f"\nreport: {out / 'sweep.md'}; log: {out / 'sweep.csv'}"
          + (f"; plot: {out / 'sweep.png'}" if plotted else ""))
