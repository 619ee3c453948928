"""The polyprune command: train, prune (structured), sparsify (unstructured), eval, bench, sweep,
export (ONNX), infer (images and video) and demo, for the polyp and nuclei tasks.

    polyprune demo                                   # synthetic data, CPU, about 5 minutes
    polyprune train --data ../kvasir-seg --out runs/unet
    polyprune prune --checkpoint runs/unet --data ../kvasir-seg --amount 0.5 --out runs/pruned
    polyprune eval --checkpoint runs/pruned --data ../kvasir-seg
    polyprune bench --checkpoint runs/pruned --size 352
    polyprune export --checkpoint runs/pruned --onnx runs/pruned.onnx
    polyprune infer --checkpoint runs/pruned --video colonoscopy.mp4 --out runs/video
    polyprune train --task nuclei --data ../dsb2018 --out runs/nuclei
    polyprune sweep --checkpoint runs/nuclei --data ../dsb2018 --out runs/sweep

Under torchrun, train and prune run on every process it starts (one per GPU; gloo on CPUs):

    torchrun --nproc-per-node 8 -m polyprune_ext.cli train --data ../kvasir-seg --out runs/unet

--data takes the task's folder layout, or "synthetic" (the default: generated images, fixed
seed). A checkpoint is a directory holding model.safetensors (weights and pruning plan) and
train_state.pt, as train, prune and sparsify write; commands that read one take its task.
"""

import argparse
from typing import Optional, Sequence

from ..engine import distributed
from . import bench, demo, evaluate, export, infer, prune, sparsify, sweep, train

COMMANDS = (train, prune, sparsify, evaluate, bench, export, infer, sweep, demo)
DISTRIBUTED = ("train", "prune")  # the commands that run under torchrun


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="polyprune", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = main.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return main


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    if not distributed.launched():
        return args.run(args)
    if args.command not in DISTRIBUTED:
        raise SystemExit(f"polyprune {args.command} runs in one process: start it without torchrun "
                         f"(under torchrun: {', '.join(DISTRIBUTED)})")
    with distributed.process_group(args.device) as args.device:
        args.run(args)
