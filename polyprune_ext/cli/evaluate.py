"""polyprune eval: a checkpoint's metrics on the validation split."""

import argparse
import json

from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="the task's metrics of a checkpoint on the validation split")
    p.add_argument("--checkpoint", required=True, help="directory written by train, prune or sparsify")
    options.add_task(p, from_checkpoint=True)
    options.add_data(p)
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    model, plan = options.load_checkpoint(args.checkpoint)
    task = options.resolve_task(args, plan)
    trainer = options.trainer_for(task, args, model, None, plan=plan)
    print(json.dumps(trainer.evaluate(), indent=1))
