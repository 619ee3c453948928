"""polyprune demo: train a small Unet on synthetic polyps, prune it to -50% FLOPs with
fine-tuning, and print the before/after table; everything on this machine, a few minutes on 2
CPU cores."""

import argparse
from pathlib import Path

from ..engine import PruneConfig, seed_everything
from ..tasks import get_task
from . import options
from .prune import run_pruning


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and prune a small Unet on synthetic polyps (CPU, minutes)")
    options.add_data(p)
    p.set_defaults(size=128)
    options.add_model(p, encoder="resnet18")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="training learning rate (default %(default)s)")
    p.add_argument("--amount", type=float, default=0.5,
                   help="fraction of the FLOPs to remove (default %(default)s)")
    p.add_argument("--step", type=float, default=0.25,
                   help="fraction of the remaining channels removed per step (default %(default)s)")
    p.add_argument("--score-batches", type=int, default=4, help="batches scored per step (default %(default)s)")
    options.add_finetuning(p, epochs=2)
    p.add_argument("--out", default="runs/demo", help="(default %(default)s)")
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    task = get_task("polyp")
    out = Path(args.out)
    model = task.build_model(args.arch, args.encoder, encoder_weights=args.encoder_weights,
                             **args.model_args)
    trainer = options.trainer_for(task, args, model, out / "trained", epochs=args.epochs, lr=args.lr)
    trainer.fit(args.epochs)
    trainer.out_dir = out / "pruned"
    config = PruneConfig(amount=args.amount, step=args.step, score_batches=args.score_batches,
                         finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                         seed=args.seed)
    run_pruning(trainer, config, args, out / "pruned",
                heading="polyprune demo: TaylorFO pruning on synthetic polyps")
