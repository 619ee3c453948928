"""polyprune prune: iterative structured pruning (score, remove filters, re-calibrate, fine-tune,
repeat) to a FLOPs, params or latency target, with a log row, a plot and a report written as it
goes; the unpruned and the pruned model timed round-robin at the end."""

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
from ..engine import PruneConfig, Trainer, distributed, iterative_prune, seed_everything
from ..engine import report
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="structured pruning of a trained checkpoint, with fine-tuning")
    options.add_checkpoint(p, "train (or prune)")
    options.add_out(p, "the pruned model, log, plot and report",
                    resume_needs=("pruning_log.json", "train_state.pt"))
    options.add_structured(p)
    options.add_task(p, from_checkpoint=True)
    options.add_data(p, size="the checkpoint's")
    options.add_run(p)
    options.add_distributed(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    seed_everything(args.seed + distributed.rank())
    plan = options.checkpoint_plan(args)
    task = options.resolve_task(args, plan)
    out = Path(args.out)
    rows = options.read_rows(out / "pruning_log.json") if args.resume else None
    data = options.datasets(task, args)
    model = options.load_checkpoint(args)
    unpruned = copy.deepcopy(model)
    trainer = options.trainer_for(task, args, model, out, data, plan=plan, lr=args.finetune_lr)
    if args.resume:
        trainer.resume()
        if distributed.is_main():
            options.say(f"resumed after step {rows[-1]['step']}, epoch {trainer.epoch}")
    config = options.prune_config(args)
    run_pruning(trainer, unpruned, config, args, out, rows=rows,
                heading=f"Structured pruning ({config.criterion}"
                        + (f", {config.grad} gradients)" if config.criterion == "taylor" else ")"))


def run_pruning(trainer: Trainer, unpruned: torch.nn.Module, config: PruneConfig,
                args: argparse.Namespace, out: Path, heading: str,
                rows: Optional[list] = None) -> list:
    """Iterative pruning with logs, plot and report written as it goes; then the unpruned and
    the pruned model timed round-robin (batch 1, the run's device and threads), the only
    latencies the log and the report give; prints the table. Under torchrun every process
    prunes and fine-tunes; rank 0 alone measures, writes and prints."""
    start = time.time()
    size = args.size or trainer.task.size
    if not distributed.is_main():
        return iterative_prune(trainer, config, rows=rows)
    key = trainer.task.headline

    def on_step(rows: list) -> None:  # the log files, and a line on stderr
        report.write_rows(rows, out)
        row = rows[-1]
        options.say(f"step {row['step']}: {row['gflops']:.3f} GFLOPs "
                    f"({row['gflops'] / rows[0]['gflops']:.0%} of the unpruned), {key} {row[key]:.4f}")
    rows = iterative_prune(trainer, config, on_step=on_step, rows=rows)
    options.say(f"timing the unpruned and the pruned model at batch 1, {size}x{size}, round-robin")
    timed = speed.compare({"unpruned": unpruned, "pruned": trainer.model}, batch=1, size=size,
                          device=args.device, threads=args.threads)
    for row, name in ((rows[0], "unpruned"), (rows[-1], "pruned")):
        row.update(ms=timed[name]["ms"], ms_p10=timed[name]["ms_p10"], ms_p90=timed[name]["ms_p90"],
                   fps=timed[name]["fps"])
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
