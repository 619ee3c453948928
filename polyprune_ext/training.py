"""Training and fine-tuning segmentation models, with checkpoints that survive a crash.

One loop serves training from scratch and the fine-tuning between pruning steps: AdamW, a cosine
or step schedule per phase, Dice+BCE loss, AMP (bfloat16 if the GPU supports it, else float16 with
a GradScaler) and channels_last on GPUs, tqdm progress, seeds. After every epoch the model
(state_dict plus pruning plan, polyprune_ext.checkpoint) and the training state (optimizer,
schedule, epoch, history, RNG) are written to temporary files and renamed over the old ones, so a
crash never leaves a half-written checkpoint, and ``resume`` continues from the last whole epoch.
"""

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoint
from .progress import progress
from .metrics import BinarySegmentationMetrics, dice_bce_loss


def build_model(arch: str = "Unet", encoder: str = "resnet34", classes: int = 1) -> torch.nn.Module:
    """An smp model by name, encoder_weights=None (no machine here reaches a model hub)."""
    import segmentation_models_pytorch as smp

    if not hasattr(smp, arch) or not isinstance(getattr(smp, arch), type):
        names = sorted(n for n in dir(smp) if isinstance(getattr(smp, n), type) and
                       issubclass(getattr(smp, n), torch.nn.Module) and n[0].isupper())
        raise ValueError(f"unknown smp architecture {arch!r}; choose one of {names}")
    if encoder not in smp.encoders.get_encoder_names() and not encoder.startswith("tu-"):
        raise ValueError(f"unknown smp encoder {encoder!r}; see smp.encoders.get_encoder_names()")
    return getattr(smp, arch)(encoder, encoder_weights=None, classes=classes)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # or "step": x0.1 at 2/3 of the phase
    workers: int = 0
    seed: int = 0
    amp: Optional[bool] = None  # None: on CUDA only
    channels_last: Optional[bool] = None  # None: on CUDA only


def save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class Trainer:
    """A model, its data, one optimizer for its whole life (training, then every pruning step's
    fine-tuning: prune_ compacts its state), and a checkpoint directory."""

    def __init__(self, model: torch.nn.Module, train_set, val_set, config: TrainConfig, *,
                 device="cpu", out_dir=None, plan: Optional[checkpoint.PruningPlan] = None,
                 progress: bool = True, loss_fn: Callable = dice_bce_loss,
                 metrics: Callable = BinarySegmentationMetrics):
        """``loss_fn(logits, target)`` and ``metrics()`` (an object with update(logits, target)
        and compute()) define the task: binary segmentation by default, the nuclei model's two
        branches with polyprune_ext.nuclei's."""
        self.device = torch.device(device)
        self.loss_fn, self.metrics = loss_fn, metrics
        self.config, self.progress = config, progress
        cuda = self.device.type == "cuda"
        self.amp = cuda if config.amp is None else config.amp
        self.channels_last = cuda if config.channels_last is None else config.channels_last
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler(enabled=self.amp and self.amp_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        self.train_loader = torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, shuffle=True, drop_last=len(train_set) > config.batch_size,
            num_workers=config.workers, generator=generator)
        self.val_loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size,
                                                      num_workers=config.workers)
        size = train_set[0][0].shape[-1]
        self.plan = plan or checkpoint.PruningPlan.for_model(model, (1, 3, size, size))
        self.out_dir = Path(out_dir) if out_dir else None
        self.epoch, self.history = 0, []

    def batches(self, loader):
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def fit(self, epochs: int, *, phase: str = "train") -> list:
        """Train ``epochs`` epochs with a fresh schedule over them, from the optimizer's rate when
        it was first fitted; validate and checkpoint after each. Returns the per-epoch records
        (also kept in ``self.history``)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"])
        steps = max(1, epochs * len(self.train_loader))
        if self.config.schedule == "cosine":
            schedule = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        elif self.config.schedule == "step":
            schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 0.1 if s >= 2 * steps // 3 else 1)
        else:
            raise ValueError(f"schedule must be 'cosine' or 'step', got {self.config.schedule!r}")
        records = []
        for _ in range(epochs):
            self.model.train()
            total, count = 0.0, 0
            for x, y in progress(self.batches(self.train_loader), len(self.train_loader),
                                  self.progress, f"{phase} epoch {self.epoch + 1}"):
                with self.autocast():
                    loss = self.loss_fn(self.model(x).float(), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss is {loss.item()} at epoch {self.epoch + 1}")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                schedule.step()
                total, count = total + loss.item() * len(x), count + len(x)
            self.epoch += 1
            record = {"phase": phase, "epoch": self.epoch, "loss": total / max(count, 1), **self.evaluate()}
            records.append(record)
            self.history.append(record)
            self.save()
        return records

    @torch.no_grad()
    def evaluate(self, loader=None) -> dict:
        """The task's metrics (Dice, IoU, precision and recall by default) on the validation set
        (or ``loader``)."""
        self.model.eval()
        metrics = self.metrics()
        for x, y in self.batches(loader or self.val_loader):
            with self.autocast():
                metrics.update(self.model(x).float(), y)
        return metrics.compute()

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self) -> None:
        """model.safetensors (+ .plan.json) and train_state.pt in out_dir, each replaced whole."""
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save(self.out_dir / "model.safetensors", self.model, self.plan)
        save_atomically({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                         "epoch": self.epoch, "history": json.dumps(self.history),
                         "config": json.dumps(dataclasses.asdict(self.config)),
                         "rng": torch.get_rng_state()}, self.out_dir / "train_state.pt")

    def resume(self) -> None:
        """Continue from out_dir's last checkpoint: the (possibly pruned) model, the optimizer's
        state, the epoch count and the history."""
        state = torch.load(self.out_dir / "train_state.pt", weights_only=True)
        path = self.out_dir / "model.safetensors"
        model = checkpoint.load(path, self.base_model()).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # The checkpoint may be pruned: its model, with a new optimizer loaded with its state.
        self.model, self.plan = model, checkpoint.read_plan(path)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.history = state["epoch"], json.loads(state["history"])
        torch.set_rng_state(state["rng"])

    def base_model(self) -> Optional[torch.nn.Module]:
        """None: checkpoint.load rebuilds smp base models from the plan."""
        return None
