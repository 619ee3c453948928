"""polyprune prune: iterative structured pruning (score, remove filters, fine-tune, repeat) to a
FLOPs or params target, with a log row, a plot and a report written as it goes."""

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .. import speed
from ..engine import PruneConfig, Trainer, iterative_prune, seed_everything
from ..engine import report
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="structured pruning of a trained checkpoint, with fine-tuning")
    p.add_argument("--checkpoint", required=True, help="directory written by train (or prune)")
    p.add_argument("--out", required=True, help="directory for the pruned model, log, plot, report")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from --out's checkpoint and pruning log")
    options.add_structured(p)
    options.add_task(p, from_checkpoint=True)
    options.add_data(p)
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    model, plan = options.load_checkpoint(args.checkpoint)
    unpruned = copy.deepcopy(model)
    task = options.resolve_task(args, plan)
    out = Path(args.out)
    trainer = options.trainer_for(task, args, model, out, plan=plan, lr=args.finetune_lr)
    rows = None
    if args.resume:
        if not (out / "pruning_log.json").exists() or not (out / "train_state.pt").exists():
            raise SystemExit(f"nothing to resume in {out}: no pruning_log.json and train_state.pt")
        trainer.resume()
        rows = json.loads((out / "pruning_log.json").read_text())
        print(f"resumed after step {rows[-1]['step']}, epoch {trainer.epoch}", file=sys.stderr)
    config = options.prune_config(args)
    run_pruning(trainer, unpruned, config, args, out, rows=rows,
                heading=f"Structured pruning ({config.criterion}"
                        + (f", {config.grad} gradients)" if config.criterion == "taylor" else ")"))


def run_pruning(trainer: Trainer, unpruned: torch.nn.Module, config: PruneConfig,
                args: argparse.Namespace, out: Path, heading: str,
                rows: Optional[list] = None) -> list:
    """Iterative pruning with logs, plot and report written as it goes; then the unpruned and
    the pruned model timed round-robin (batch 1, the run's device and threads), the only
    latencies the log and the report give; prints the table."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    size = args.size or trainer.task.size
    rows = iterative_prune(trainer, config, on_step=lambda rows: report.write_rows(rows, out), rows=rows)
    print(f"timing the unpruned and the pruned model at batch 1, {size}x{size}, round-robin",
          file=sys.stderr, flush=True)
    timed = speed.compare({"unpruned": unpruned, "pruned": trainer.model}, batch=1, size=size,
                          device=args.device, threads=args.threads)
    for row, key in ((rows[0], "unpruned"), (rows[-1], "pruned")):
        row.update(ms=timed[key]["ms"], ms_p10=timed[key]["ms_p10"], ms_p90=timed[key]["ms_p90"],
                   fps=timed[key]["fps"])
    report.write_rows(rows, out)
    metrics, headline = trainer.task.reported, trainer.task.reported[0]
    plot = out / f"{headline.key}_vs_flops.png"
    plotted = report.plot_against_flops(rows, headline, plot)
    details = [f"- command: `polyprune {' '.join(sys.argv[1:])}`",
               f"- data: {args.data}, {size}x{size}, device {args.device}",
               f"- latency: batch 1, {timed['pruned']['threads']} threads, median of "
               f"{timed['pruned']['repeats']} runs each, unpruned and pruned timed round-robin at the end",
               f"- pruning: {json.dumps(dataclasses.asdict(config))}",
               f"- wall time: {time.time() - start:.0f} s",
               f"- plot: {plot.name}" if plotted else "- plot: matplotlib is not installed"]
    path = report.write_report(rows, metrics, out, heading, details)
    print(report.before_after(rows, metrics))
    print(f"\nreport: {path}; log: {out / 'pruning_log.csv'}; model: {out / 'model.safetensors'}"
          + (f"; plot: {plot}" if plotted else ""))
    return rows
