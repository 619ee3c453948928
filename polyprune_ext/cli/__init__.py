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

--data is the task's folder layout, or "synthetic" (generated images, fixed seed); every file of a
folder is decoded and checked before anything runs. A checkpoint is a folder holding
model.safetensors (weights and pruning plan) and train_state.pt, as train, prune and sparsify
write; commands that read one take its task and input size. An --out folder is locked while a
run writes it, and a folder holding a run is refused unless --resume continues it.

Arguments, paths and data are checked before any model is loaded; a problem is one line on
stderr, exit status 2 (--debug, or POLYPRUNE_DEBUG=1, shows the traceback instead).

Under torchrun, train and prune run on every process it starts (one per GPU; gloo on CPUs):

    torchrun --nproc-per-node 8 -m polyprune_ext.cli train --data ../kvasir-seg --out runs/unet
"""

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Any, NoReturn, Optional, Sequence

import torch

from ..engine import distributed
from . import bench, demo, evaluate, export, infer, options, prune, sparsify, sweep, train

COMMANDS = (train, prune, sparsify, evaluate, bench, export, infer, sweep, demo)
DISTRIBUTED = ("train", "prune")  # the commands that run under torchrun
# Failures a user can fix: bad values, files and folders, a diverging loss, memory.
EXPECTED = (options.CommandError, ValueError, OSError, FloatingPointError, torch.cuda.OutOfMemoryError)


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every lock and temporary file is released."""


class Parser(argparse.ArgumentParser):
    """An argument error in one line, as every other failure is reported."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    main = Parser(prog="polyprune", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = main.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true",
                       help="show the traceback of a failure (also: POLYPRUNE_DEBUG=1)")
    return main


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    debug = args.debug or os.environ.get("POLYPRUNE_DEBUG", "") not in ("", "0")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        if distributed.launched() and args.command not in DISTRIBUTED:
            raise options.CommandError(f"polyprune {args.command} runs in one process: start it without "
                                       f"torchrun (under torchrun: {', '.join(DISTRIBUTED)})")
        # Under torchrun rank 0 alone writes, so it alone holds the --out lock.
        writer = not distributed.launched() or os.environ.get("RANK", "0") == "0"
        with options.output_folder(args) if writer else contextlib.nullcontext():
            if args.command in DISTRIBUTED:
                with distributed.process_group(args.device) as args.device:
                    args.run(args)
            else:
                args.run(args)
    except (KeyboardInterrupt, Terminated) as stop:
        if debug:
            raise
        resume = f"; `--resume` continues it from {args.out}" if getattr(args, "resume_needs", ()) else ""
        _fail(args, f"{'terminated' if isinstance(stop, Terminated) else 'interrupted'}{resume}",
              143 if isinstance(stop, Terminated) else 130)
    except torch.cuda.OutOfMemoryError:
        if debug:
            raise
        _fail(args, f"out of memory on {args.device}: lower --batch-size (or --size)")
    except EXPECTED as error:
        if debug:
            raise
        _fail(args, str(error) if str(error) else type(error).__name__)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise Terminated


def _fail(args: argparse.Namespace, message: str, status: int = 2) -> NoReturn:
    print(f"polyprune {args.command}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)
