"""polyprune sparsify: unstructured magnitude pruning to a sparsity, fine-tuned with the masks
held, then made permanent. Zeros make the model smaller in a compressed checkpoint, not faster."""

import argparse
import json
from pathlib import Path

from .. import choices
from ..choices import Scope
from ..engine import seed_everything
from ..engine.iterative import after_prune
from ..unstructured import magnitude
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sparsify", help="unstructured magnitude pruning (zeros), fine-tuned")
    options.add_checkpoint(p, "train")
    options.add_out(p, "the sparsified model")
    p.add_argument("--sparsity", type=options.fraction, default=0.9,
                   help="fraction of conv weights zeroed (default %(default)s)")
    p.add_argument("--scope", choices=choices.names(Scope), default="global",
                   help="one network-wide threshold, or the same sparsity per layer (default %(default)s)")
    options.add_recalibration(p)
    options.add_finetuning(p, epochs=3)
    options.add_task(p, from_checkpoint=True)
    options.add_data(p, size="the checkpoint's")
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    seed_everything(args.seed)
    plan = options.checkpoint_plan(args)
    task = options.resolve_task(args, plan)
    data = options.datasets(task, args)
    model = options.load_checkpoint(args)
    trainer = options.trainer_for(task, args, model, Path(args.out), data, plan=plan, lr=args.finetune_lr)
    before = trainer.evaluate()
    reached = magnitude.magnitude_prune_(trainer.model, args.sparsity, scope=args.scope)
    measured = after_prune(trainer, args.bn_recal_images)
    with trainer.checkpoints_paused():  # a checkpoint holding the masks would not load
        trainer.fit(args.finetune_epochs, phase="fine-tune")
    magnitude.make_permanent_(trainer.model)
    trainer.save()
    after = trainer.evaluate()
    print(json.dumps({"sparsity": reached, "before": before, **measured, "after": after}, indent=1))
