"""polyprune sweep: magnitude pruning at each compression ratio, layer-wise and network-wide,
fine-tuned at every point; table, plot, report (Mahbod et al. 2022)."""

import argparse
import json
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
    p.add_argument("--checkpoint", required=True, help="directory written by train")
    p.add_argument("--out", required=True, help="directory for the log, plot, report and points")
    p.add_argument("--crs", type=float, nargs="+", default=list(sweep.CRS),
                   help="compression ratios: prunable weights / remaining weights (default %(default)s)")
    p.add_argument("--scopes", nargs="+", choices=choices.names(Scope), default=["layer", "global"],
                   help="(default %(default)s)")
    options.add_recalibration(p)
    options.add_finetuning(p, epochs=2)
    p.add_argument("--one-shot", action="store_true",
                   help="prune the trained model afresh at each CR (default: gradually)")
    p.add_argument("--keep-first", action="store_true", help="leave the first conv of each network dense")
    p.add_argument("--keep-last", action="store_true", help="leave the last conv of each network dense")
    p.add_argument("--biases", action="store_true", help="prune conv biases too")
    p.add_argument("--resume", action="store_true", help="continue from --out's sweep.json")
    options.add_task(p, from_checkpoint=True)
    options.add_data(p)
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    model, plan = options.load_checkpoint(args.checkpoint)
    task = options.resolve_task(args, plan)
    out = Path(args.out)
    trainer = options.trainer_for(task, args, model, None, plan=plan)
    rows = None
    if args.resume and (out / "sweep.json").exists():
        rows = json.loads((out / "sweep.json").read_text())
        print(f"resuming after {len(rows)} points", file=sys.stderr)
    start = time.time()
    rows = compression_sweep(
        trainer, crs=args.crs, scopes=args.scopes, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, gradual=not args.one_shot, first=not args.keep_first,
        last=not args.keep_last, biases=args.biases, bn_recal_images=args.bn_recal_images,
        out_dir=out / "points", rows=rows,
        on_row=lambda rows: report.write_rows(rows, out, "sweep"))
    plotted = sweep.plot_sweep(rows, task.reported, out / "sweep.png")
    size = args.size or task.size
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
