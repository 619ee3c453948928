"""polyprune train: train a task's model from scratch, a checkpoint every epoch."""

import argparse
import json
import sys
from pathlib import Path

from ..engine import seed_everything
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from scratch (or from --encoder-weights)")
    options.add_task(p)
    options.add_data(p)
    options.add_model(p)
    p.add_argument("--epochs", type=int, default=30, help="(default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--out", required=True, help="directory for checkpoints (written every epoch)")
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    task = options.resolve_task(args)
    out = Path(args.out)
    model = task.build_model(args.arch, args.encoder, encoder_weights=args.encoder_weights,
                             **args.model_args)
    trainer = options.trainer_for(task, args, model, out, epochs=args.epochs, lr=args.lr)
    if args.resume:
        trainer.resume()
        print(f"resumed at epoch {trainer.epoch}", file=sys.stderr)
    records = trainer.fit(max(0, args.epochs - trainer.epoch)) if args.epochs > trainer.epoch else []
    for r in records:
        print(json.dumps(r))
    print(json.dumps({"checkpoint": str(out / "model.safetensors"), **trainer.evaluate()}))
