"""polyprune prune: iterative structured pruning (score, remove filters, fine-tune, repeat) to a
FLOPs or params target, with a log row, a plot and a report written as it goes."""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import speed
from ..engine import PruneConfig, Trainer, distributed, iterative_prune, seed_everything
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
    options.add_distributed(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    seed_everything(args.seed + distributed.rank())
    model, plan = options.load_checkpoint(args.checkpoint)
    task = options.resolve_task(args, plan)
    out = Path(args.out)
    trainer = options.trainer_for(task, args, model, out, plan=plan, lr=args.finetune_lr)
    rows = None
    if args.resume:
        if not (out / "pruning_log.json").exists() or not (out / "train_state.pt").exists():
            raise SystemExit(f"nothing to resume in {out}: no pruning_log.json and train_state.pt")
        trainer.resume()
        rows = json.loads((out / "pruning_log.json").read_text())
        if distributed.is_main():
            print(f"resumed after step {rows[-1]['step']}, epoch {trainer.epoch}", file=sys.stderr)
    run_pruning(trainer, options.prune_config(args), args, out,
                heading="TaylorFO structured pruning", rows=rows)


def latency_columns(device: str, size: int) -> Callable[[torch.nn.Module], dict[str, Any]]:
    """Batch-1 fp32 latency on the run's device: the column every log row carries."""
    def measure(model: torch.nn.Module) -> dict[str, Any]:
        row = speed.latency(model, batch=1, size=size, device=device, warmup=3, repeats=10)
        return {"ms": row["ms"], "fps": row["fps"]}
    return measure


def run_pruning(trainer: Trainer, config: PruneConfig, args: argparse.Namespace, out: Path,
                heading: str, rows: Optional[list] = None) -> list:
    """Iterative pruning with logs, plot and report written as it goes; prints the table. Under
    torchrun every process prunes and fine-tunes; rank 0 alone measures, writes and prints."""
    start = time.time()
    size = args.size or trainer.task.size
    if not distributed.is_main():
        return iterative_prune(trainer, config, rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    rows = iterative_prune(trainer, config, measure=latency_columns(args.device, size),
                           on_step=lambda rows: report.write_rows(rows, out), rows=rows)
    metrics, headline = trainer.task.reported, trainer.task.reported[0]
    plot = out / f"{headline.key}_vs_flops.png"
    plotted = report.plot_against_flops(rows, headline, plot)
    details = [f"- command: `polyprune {' '.join(sys.argv[1:])}`",
               f"- data: {args.data}, {size}x{size}, device {args.device}",
               f"- pruning: {json.dumps(dataclasses.asdict(config))}",
               f"- wall time: {time.time() - start:.0f} s",
               f"- plot: {plot.name}" if plotted else "- plot: matplotlib is not installed"]
    path = report.write_report(rows, metrics, out, heading, details)
    print(report.before_after(rows, metrics))
    print(f"\nreport: {path}; log: {out / 'pruning_log.csv'}; model: {out / 'model.safetensors'}"
          + (f"; plot: {plot}" if plotted else ""))
    return rows
