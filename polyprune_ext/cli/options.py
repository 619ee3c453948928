"""Option groups the commands share, their argument types (a bad value is refused while the
command line is parsed, before anything loads), and what the commands build from them: the task,
the data (a folder scanned first), the checkpoint, the output folder (locked), the Trainer.

A failure a user can fix is raised as CommandError, or as the ValueError or OSError the library
raises, naming the file or value; cli.main prints it as one line."""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .. import _io, choices
from ..choices import Criterion, Grad, MixingNorms, Reduce, Scope
from ..engine import PruneConfig, TrainConfig, Trainer
from ..engine.iterative import TARGETS
from ..engine.task import Task
from ..structure.plan import PruningPlan, load, read_plan
from ..tasks import NAMES, get_task, task_of

CHECKPOINT = "model.safetensors"


class CommandError(Exception):
    """An expected failure of a command, said in one line (cli.main prints it; exit status 2)."""


# -- argument types --------------------------------------------------------------------------------


def _number(kind: Callable[[str], Any], valid: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
count = _number(int, lambda v: v >= 0, "an integer >= 0")
fraction = _number(float, lambda v: 0 < v < 1, "a fraction between 0 and 1 (exclusive)")
positive_float = _number(float, lambda v: v > 0, "a positive number")
compression_ratio = _number(float, lambda v: v >= 1, "a compression ratio >= 1")
seed = _number(int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")  # numpy's range
# smp encoders halve the input five times: other sides fail in the first forward pass
input_size = _number(int, lambda v: v > 0 and v % 32 == 0, "a positive multiple of 32")


def device(text: str) -> str:
    """A device this machine has."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available()
                                  or (parsed.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device here ({torch.cuda.device_count()} "
                                         "visible); use --device cpu")
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return text


def data_source(text: str) -> str:
    if text != "synthetic" and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder (or 'synthetic' for generated data)")
    return text


def checkpoint_folder(text: str) -> str:
    if not (Path(text) / CHECKPOINT).is_file():
        raise argparse.ArgumentTypeError(f"no checkpoint at {Path(text) / CHECKPOINT}: pass the --out "
                                         "folder of `polyprune train`, prune or sparsify")
    return text


# -- option groups ----------------------------------------------------------------------------------


def add_task(p: argparse.ArgumentParser, *, from_checkpoint: bool = False) -> None:
    default = "the checkpoint's" if from_checkpoint else "polyp"
    p.add_argument("--task", choices=NAMES, default=None if from_checkpoint else "polyp",
                   help=f"polyp: binary masks; nuclei: instances (mask + distance map) "
                        f"(default: {default})")


def add_checkpoint(p: argparse.ArgumentParser, written_by: str) -> None:
    p.add_argument("--checkpoint", required=True, type=checkpoint_folder,
                   help=f"folder written by {written_by}")


def add_out(p: argparse.ArgumentParser, what: str, *, resume_needs: tuple[str, ...] = (),
            default: Optional[str] = None) -> None:
    """--out, and --resume when the command can continue a run (it needs ``resume_needs``)."""
    p.add_argument("--out", required=default is None, default=default,
                   help=f"folder for {what}; new or empty" + (", unless --resume" if resume_needs else "")
                        + (" (default %(default)s)" if default else ""))
    if resume_needs:
        p.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --out (the only way to write into "
                            "a folder that holds one)")
    p.set_defaults(resume_needs=resume_needs)


def add_data(p: argparse.ArgumentParser, *, required: bool = True,
             size: str = "the task's, 352 polyp, 256 nuclei") -> None:
    p.add_argument("--data", type=data_source, required=required, default=None if required else "synthetic",
                   help="polyp: images/ + masks/ folder; nuclei: DSB2018 folder (<id>/images, "
                        "<id>/masks) or images/ + labels/ folder; or 'synthetic' (generated)"
                        + ("" if required else " (default synthetic)"))
    p.add_argument("--size", type=input_size, default=None,
                   help=f"input side in pixels, a multiple of 32 (default: {size})")
    p.add_argument("--val-count", type=count, default=None,
                   help="validation images (default: 12%% of the set; Kvasir-SEG benchmarks use 120)")
    p.add_argument("--synthetic-count", type=positive_int, default=None,
                   help="images in the synthetic set (default: 240 polyp, 200 nuclei)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="the global batch: under torchrun each process takes its share (default %(default)s)")
    p.add_argument("--workers", type=count, default=0, help="DataLoader worker processes (default %(default)s)")
    p.add_argument("--allow-resize-masks", action="store_true",
                   help="stretch a mask of another size than its image to it (default: refuse)")


def add_model(p: argparse.ArgumentParser, *, encoder: str = "resnet34") -> None:
    add_arch(p, encoder=encoder)
    p.add_argument("--encoder-weights", default=None,
                   help="pretrained encoder weights, e.g. imagenet (needs a machine that reaches "
                        "the model hub; default: none, random initialisation)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default %(default)s)")


def add_run(p: argparse.ArgumentParser, *, progress: bool = True) -> None:
    """--device, --seed and, for commands with progress bars, --no-progress."""
    add_device(p)
    p.add_argument("--seed", type=seed, default=0,
                   help="split, initialisation and shuffling seed (default %(default)s)")
    if progress:
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bars (a line per epoch is printed either way)")


def add_distributed(p: argparse.ArgumentParser) -> None:
    """What train and prune take for torchrun runs."""
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch "
                        "(SyncBatchNorm), not each process's share")
def add_arch(p: argparse.ArgumentParser, *, encoder: str = "resnet34", when: str = "") -> None:
    """--arch, --encoder and --model-args: the model models.named_model builds."""
    p.add_argument("--arch", default="Unet",
                   help=f"smp architecture, or monai.<Network> for a MONAI one (monai.UNet, "
                        f"monai.SegResNet, ...; the monai extra){when} (default %(default)s)")
    p.add_argument("--encoder", default=encoder,
                   help=f"smp encoder; MONAI networks have none{when} (default %(default)s)")
    p.add_argument("--model-args", type=model_args, default={},
                   help="the model's other constructor arguments, a JSON object: "
                        "'{\"channels\": [16, 32, 64, 128], \"strides\": [2, 2, 2]}' for "
                        f"monai.UNet (MONAI networks are 2-D, 3 channels in, 1 out by default){when}")


def model_args(text: str) -> dict:
    """--model-args: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of constructor arguments, not {text}")
    return value




def add_structured(p: argparse.ArgumentParser, *, amount: float = 0.5, step: float = 0.2,
                   score_batches: int = 8, finetune_epochs: int = 3) -> None:
    """What iterative structured pruning takes (PruneConfig)."""
    p.add_argument("--criterion", choices=choices.names(Criterion), default="taylor",
                   help="channel importance: TaylorFO, or the l1, l2, bn_scale, random baselines "
                        "(default %(default)s)")
    p.add_argument("--grad", choices=choices.names(Grad), default="normalized",
                   help="TaylorFO's gradient: each sample's output gradient at unit norm "
                        "(Sapkota et al. 2023), the loss gradient, or random (default %(default)s)")
    p.add_argument("--reduce", choices=choices.names(Reduce), default="abs_sum",
                   help="how per-sample scores are summed over the batch (default %(default)s)")
    p.add_argument("--target", choices=TARGETS, default="flops",
                   help="what --amount is a fraction of: latency is predicted by a latency model "
                        "measured on --device with --threads (default %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads of the deployment: the latency model's and the final "
                        "latency measurement's (default: torch's, one per core)")
    add_amount(p, amount=amount, step=step)
    p.add_argument("--steps", type=positive_int, default=None,
                   help="or exactly this many steps, each removing the same share of the target "
                        "(default: as many as --step takes)")
    p.add_argument("--scope", choices=choices.names(Scope), default="global",
                   help="one ranking over the network, or the same fraction per layer (default %(default)s)")
    add_score_batches(p, score_batches)
    p.add_argument("--round-to", type=positive_int, default=None,
                   help="keep multiples of this many channels (default: 1, or for a latency "
                        "target the device's, measured)")
    p.add_argument("--normalize-layers", action="store_true",
                   help="divide each layer's scores by their L2 norm before the global ranking")
    p.add_argument("--flops-weighted", action="store_true",
                   help="rank channels by score per FLOP they cost")
    add_recalibration(p)
    p.add_argument("--mixing-norms", choices=choices.names(MixingNorms), default="freeze",
                   help="channels of norms that mix them (layer norm over channels, as in "
                        "ConvNeXt): kept, or pruned too, the norms' statistics then running over "
                        "the channels left (default %(default)s)")
    add_finetuning(p, epochs=finetune_epochs)


def add_amount(p: argparse.ArgumentParser, *, amount: float, step: float) -> None:
    p.add_argument("--amount", type=fraction, default=amount,
                   help="fraction of the FLOPs (or --target) to remove (default %(default)s)")
    p.add_argument("--step", type=fraction, default=step,
                   help="fraction of the remaining channels removed per step (default %(default)s)")


def add_score_batches(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--score-batches", type=positive_int, default=default,
                   help="batches scored per step (default %(default)s)")


def add_recalibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bn-recal-images", type=count, default=256,
                   help="training images the BatchNorm statistics are re-estimated on after each "
                        "prune, before fine-tuning; 0: never (default %(default)s)")


def add_finetuning(p: argparse.ArgumentParser, *, epochs: int) -> None:
    p.add_argument("--finetune-epochs", type=count, default=epochs,
                   help="fine-tuning epochs after each pruning (default %(default)s)")
    # Fine-tuning a trained model wants a smaller rate than training it (Kvasir-SEG, resnet18:
    # 1.4 Dice points better at 3e-4 than at 1e-3 after a -50% FLOPs prune).
    p.add_argument("--finetune-lr", type=positive_float, default=3e-4,
                   help="AdamW learning rate while fine-tuning (default %(default)s)")


def prune_config(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(target=args.target, amount=args.amount, step=args.step, steps=args.steps,
                       criterion=args.criterion, grad=args.grad, reduce=args.reduce,
                       normalize_layers=args.normalize_layers, flops_weighted=args.flops_weighted,
                       score_batches=args.score_batches, bn_recal_images=args.bn_recal_images,
                       finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                       scope=args.scope, round_to=args.round_to, latency_threads=args.threads,
                       mixing_norms=args.mixing_norms, seed=args.seed)


# -- what the commands build -----------------------------------------------------------------------


@contextlib.contextmanager
def output_folder(args: argparse.Namespace) -> Iterator[None]:
    """The command's --out (none: nothing to do), locked while the command runs: a run already
    writing it is refused, and so is a folder holding an earlier run unless --resume continues it
    (--resume needs one). A folder this creates is removed again if the command wrote nothing."""
    if getattr(args, "out", None) is None:
        yield
        return
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    created = not out.exists()
    try:
        with contextlib.ExitStack() as stack:
            try:
                stale = stack.enter_context(_io.locked_folder(out))
            except FileExistsError as error:  # another run holds it
                raise CommandError(str(error)) from None
            except OSError as error:
                raise CommandError(f"cannot write to --out {out}: {error.strerror or error}") from None
            if stale is not None:
                say(f"taking over {out}: {_io.describe_holder(stale)}, which locked it, has ended")
            _check_run_folder(out, args)
            yield
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _check_run_folder(out: Path, args: argparse.Namespace) -> None:
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    resume = getattr(args, "resume", False)
    if held and not resume:
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        again = "pass --resume to continue it, or " if args.resume_needs else ""
        raise CommandError(f"{out} already holds a run ({listed}): {again}choose another --out")
    missing = [name for name in args.resume_needs if not (out / name).exists()] if resume else []
    if missing:
        raise CommandError(f"nothing to resume in {out}: no {' or '.join(missing)}")


def say(line: str) -> None:
    """A progress or status line on stderr, flushed (a log of a killed run keeps it)."""
    print(line, file=sys.stderr, flush=True)


def resolve_task(args: argparse.Namespace, plan: Optional[PruningPlan] = None) -> Task:
    """The --task, or the checkpoint's; a checkpoint of another task is refused. Fills in the
    default --size: the checkpoint's, else the task's."""
    task = get_task(args.task) if args.task else task_of(plan) if plan else get_task("polyp")
    if plan is not None and task is not task_of(plan):
        raise CommandError(f"{Path(args.checkpoint) / CHECKPOINT} holds a {task_of(plan).name} model, "
                           f"not a {task.name} one: leave --task out, or pass --task {task_of(plan).name}")
    if getattr(args, "size", None) is None:
        args.size = plan.input_shape[-1] if plan else task.size
    return task


def checkpoint_plan(args: argparse.Namespace) -> PruningPlan:
    """The pruning plan of --checkpoint, read (not the weights) to check it and learn its task."""
    plan = read_plan(Path(args.checkpoint) / CHECKPOINT)
    task_of(plan)  # imports the task, which registers its model family
    return plan


def load_checkpoint(args: argparse.Namespace) -> torch.nn.Module:
    """The model of --checkpoint (its task imported first: it registers the model family)."""
    checkpoint_plan(args)
    return load(Path(args.checkpoint) / CHECKPOINT)


def datasets(task: Task, args: argparse.Namespace) -> tuple[Any, Any]:
    """(train, val) of --data; a folder is scanned first: every file decoded, every mask's size
    checked, any problem refused naming the files. Says on stderr what the data is."""
    start = time.perf_counter()
    synthetic = args.data == "synthetic"
    train, val = task.load_data(None if synthetic else args.data, size=args.size,
                                val_count=args.val_count, seed=args.seed, count=args.synthetic_count,
                                verify=True, allow_resize_masks=args.allow_resize_masks)
    source = ("synthetic (generated images, not real data)" if synthetic else
              f"{args.data}, every file checked in {time.perf_counter() - start:.1f} s")
    say(f"data: {len(train)} training and {len(val)} validation images at {args.size}x{args.size}, "
        f"{source}")
    return train, val


def trainer_for(task: Task, args: argparse.Namespace, model: torch.nn.Module, out: Optional[Path],
                data: tuple[Any, Any], *, plan: Optional[PruningPlan] = None, epochs: int = 0,
                lr: float = 1e-3) -> Trainer:
    """A Trainer for ``model`` on ``data`` (from datasets()), with the options' batch size,
    workers, seed, device and progress bars."""
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr, workers=args.workers,
                         seed=args.seed, sync_batchnorm=getattr(args, "sync_bn", False))
    return Trainer(model, task, *data, config, device=args.device, out_dir=out, plan=plan,
                   progress=not args.no_progress)


def read_rows(path: Path) -> list:
    """The rows of a log a run wrote (pruning_log.json, sweep.json), to resume it."""
    try:
        rows = json.loads(path.read_text())
    except ValueError as error:
        raise CommandError(f"{path} is not readable JSON ({error}): the run cannot be resumed") from None
    if not isinstance(rows, list) or not rows:
        raise CommandError(f"{path} holds no logged rows: the run cannot be resumed")
    return rows
