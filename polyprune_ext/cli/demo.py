"""polyprune demo: train a small Unet on synthetic polyps, prune it to -50% FLOPs with
fine-tuning, and print the before/after table; everything on this machine, a few minutes on 2
CPU cores."""

import argparse
import copy
from pathlib import Path

from ..engine import PruneConfig, seed_everything
from ..tasks import get_task
from . import options
from .prune import run_pruning


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and prune a small Unet on synthetic polyps (CPU, minutes)")
    options.add_data(p, required=False, size="128")
    p.set_defaults(size=128)
    options.add_model(p, encoder="resnet18")
    p.add_argument("--epochs", type=options.positive_int, default=8,
                   help="training epochs (default %(default)s)")
    p.add_argument("--lr", type=options.positive_float, default=1e-3,
                   help="training learning rate (default %(default)s)")
    options.add_amount(p, amount=0.5, step=0.25)
    options.add_score_batches(p, 4)
    options.add_recalibration(p)
    options.add_finetuning(p, epochs=2)
    p.add_argument("--threads", type=options.positive_int, default=None,
                   help="torch threads for the final latency measurement (default: torch's, one per core)")
    options.add_out(p, "the trained and the pruned model (trained/, pruned/)", default="runs/demo")
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    task = get_task("polyp")
    out = Path(args.out)
    model = task.build_model(args.arch, args.encoder, encoder_weights=args.encoder_weights,
                             **args.model_args)
    data = options.datasets(task, args)
    trainer = options.trainer_for(task, args, model, out / "trained", data, epochs=args.epochs, lr=args.lr)
    trainer.fit(args.epochs)
    trainer.out_dir = out / "pruned"
    config = PruneConfig(amount=args.amount, step=args.step, score_batches=args.score_batches,
                         bn_recal_images=args.bn_recal_images, finetune_epochs=args.finetune_epochs,
                         finetune_lr=args.finetune_lr, seed=args.seed)
    run_pruning(trainer, copy.deepcopy(trainer.model), config, args, out / "pruned",
                heading="polyprune demo: TaylorFO pruning on synthetic polyps")
