"""Option groups the commands share, and what they build from them: the task, the model, the
Trainer (trainer_for, also used by the benchmarks)."""

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from .. import choices
from ..choices import Criterion, Grad, MixingNorms, Reduce, Scope
from ..engine import PruneConfig, TrainConfig, Trainer
from ..engine.task import Task
from ..structure.plan import PruningPlan, load, read_plan
from ..tasks import NAMES, get_task, task_of


def add_task(p: argparse.ArgumentParser, *, from_checkpoint: bool = False) -> None:
    default = "the checkpoint's" if from_checkpoint else "polyp"
    p.add_argument("--task", choices=NAMES, default=None if from_checkpoint else "polyp",
                   help=f"polyp: binary masks; nuclei: instances (mask + distance map) "
                        f"(default: {default})")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic",
                   help="polyp: images/ + masks/ folder; nuclei: DSB2018 folder (<id>/images, "
                        "<id>/masks) or images/ + labels/ folder; or 'synthetic' (default)")
    p.add_argument("--size", type=int, default=None,
                   help="input side in pixels (default: the task's, 352 polyp, 256 nuclei)")
    p.add_argument("--val-count", type=int, default=None,
                   help="validation images (default: 12%% of the set; Kvasir-SEG benchmarks use 120)")
    p.add_argument("--synthetic-count", type=int, default=None,
                   help="images in the synthetic set (default: the task's, 240 polyp, 200 nuclei)")
    p.add_argument("--batch-size", type=int, default=8, help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default %(default)s)")


def add_model(p: argparse.ArgumentParser, *, encoder: str = "resnet34") -> None:
    add_arch(p, encoder=encoder)
    p.add_argument("--encoder-weights", default=None,
                   help="pretrained encoder weights, e.g. imagenet (needs a machine that reaches "
                        "the model hub; default: none, random initialisation)")


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


def add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split, initialisation and shuffling seed (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    p.add_argument("--target", choices=("flops", "params"), default="flops",
                   help="what --amount is a fraction of (default %(default)s)")
    p.add_argument("--amount", type=float, default=amount,
                   help="fraction of the target to remove (default %(default)s)")
    p.add_argument("--step", type=float, default=step,
                   help="fraction of the remaining channels removed per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="or exactly this many steps, each removing the same share of the target")
    p.add_argument("--scope", choices=choices.names(Scope), default="global",
                   help="one ranking over the network, or the same fraction per layer (default %(default)s)")
    p.add_argument("--score-batches", type=int, default=score_batches,
                   help="batches scored per step (default %(default)s)")
    p.add_argument("--round-to", type=int, default=1,
                   help="keep multiples of this many channels (default %(default)s)")
    p.add_argument("--normalize-layers", action="store_true",
                   help="divide each layer's scores by their L2 norm before the global ranking")
    p.add_argument("--flops-weighted", action="store_true",
                   help="rank channels by score per FLOP they cost")
    p.add_argument("--mixing-norms", choices=choices.names(MixingNorms), default="freeze",
                   help="channels of norms that mix them (layer norm over channels, as in "
                        "ConvNeXt): kept, or pruned too, the norms' statistics then running over "
                        "the channels left (default %(default)s)")
    add_finetuning(p, epochs=finetune_epochs)


def add_finetuning(p: argparse.ArgumentParser, *, epochs: int) -> None:
    p.add_argument("--finetune-epochs", type=int, default=epochs,
                   help="fine-tuning epochs after each pruning (default %(default)s)")
    # Fine-tuning a trained model wants a smaller rate than training it (Kvasir-SEG, resnet18:
    # 1.4 Dice points better at 3e-4 than at 1e-3 after a -50% FLOPs prune).
    p.add_argument("--finetune-lr", type=float, default=3e-4,
                   help="AdamW learning rate while fine-tuning (default %(default)s)")


def prune_config(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(target=args.target, amount=args.amount, step=args.step, steps=args.steps,
                       criterion=args.criterion, grad=args.grad, reduce=args.reduce,
                       normalize_layers=args.normalize_layers, flops_weighted=args.flops_weighted,
                       score_batches=args.score_batches, finetune_epochs=args.finetune_epochs,
                       finetune_lr=args.finetune_lr, scope=args.scope, round_to=args.round_to,
                       mixing_norms=args.mixing_norms, seed=args.seed)


def resolve_task(args: argparse.Namespace, plan: Optional[PruningPlan] = None) -> Task:
    """The --task, or the checkpoint's; a checkpoint of another task is refused."""
    task = get_task(args.task) if args.task else task_of(plan) if plan else get_task("polyp")
    if plan is not None and task is not task_of(plan):
        raise SystemExit(f"the checkpoint holds a {task_of(plan).name} model, not a {task.name} "
                         f"one: leave --task out, or pass --task {task_of(plan).name}")
    return task


def trainer_for(task: Task, args: argparse.Namespace, model: torch.nn.Module,
                out: Optional[Path], *, plan: Optional[PruningPlan] = None, epochs: int = 0,
                lr: float = 1e-3) -> Trainer:
    """A Trainer for ``model`` on the data the options name."""
    train_set, val_set = task.load_data(None if args.data == "synthetic" else args.data,
                                        size=args.size or task.size, val_count=args.val_count,
                                        seed=args.seed, count=args.synthetic_count)
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr, workers=args.workers,
                         seed=args.seed)
    return Trainer(model, task, train_set, val_set, config, device=args.device, out_dir=out,
                   plan=plan, progress=not args.no_progress)


def load_checkpoint(directory: str) -> tuple[torch.nn.Module, PruningPlan]:
    """The model and plan of a directory that train, prune or sparsify wrote."""
    path = Path(directory) / "model.safetensors"
    if not path.exists():
        raise SystemExit(f"no checkpoint at {path}: pass the --out directory of `polyprune train`")
    plan = read_plan(path)
    task_of(plan)  # imports the task, which registers its model family
    return load(path), plan
