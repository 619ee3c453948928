"""polyprune train: train a task's model from scratch, a checkpoint every epoch."""

import argparse
import json
from pathlib import Path

from ..engine import distributed, seed_everything
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from scratch (or from --encoder-weights)")
    options.add_task(p)
    options.add_data(p)
    options.add_model(p)
    p.add_argument("--epochs", type=options.positive_int, default=30,
                   help="training epochs, counting those of a resumed run (default %(default)s)")
    p.add_argument("--lr", type=options.positive_float, default=1e-3,
                   help="AdamW learning rate (default %(default)s)")
    options.add_out(p, "the checkpoints (written every epoch)", resume_needs=("train_state.pt",))
    options.add_run(p)
    options.add_distributed(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    # each process its own augmentations; DDP starts them all from rank 0's weights
    seed_everything(args.seed + distributed.rank())
    task = options.resolve_task(args)
    out = Path(args.out)
    model = task.build_model(args.arch, args.encoder, encoder_weights=args.encoder_weights,
                             **args.model_args)
    data = options.datasets(task, args)
    trainer = options.trainer_for(task, args, model, out, data, epochs=args.epochs, lr=args.lr)
    if args.resume:
        trainer.resume()
        if distributed.is_main():
            options.say(f"resumed at epoch {trainer.epoch}")
    records = trainer.fit(max(0, args.epochs - trainer.epoch))
    if not distributed.is_main():
        return
    for r in records:
        print(json.dumps(r))
    print(json.dumps({"checkpoint": str(out / options.CHECKPOINT), **trainer.evaluate()}))
