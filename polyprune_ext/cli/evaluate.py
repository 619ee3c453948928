"""polyprune eval: a checkpoint's metrics on the validation split."""

import argparse
import json

from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="the task's metrics of a checkpoint on the validation split")
    options.add_checkpoint(p, "train, prune or sparsify")
    options.add_task(p, from_checkpoint=True)
    options.add_data(p, size="the checkpoint's")
    options.add_run(p, progress=False)
    p.set_defaults(run=run, no_progress=True)


def run(args: argparse.Namespace) -> None:
    plan = options.checkpoint_plan(args)
    task = options.resolve_task(args, plan)
    data = options.datasets(task, args)
    model = options.load_checkpoint(args)
    trainer = options.trainer_for(task, args, model, None, data, plan=plan)
    print(json.dumps(trainer.evaluate(), indent=1))
