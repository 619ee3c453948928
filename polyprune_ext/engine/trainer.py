"""Training and fine-tuning segmentation models, with checkpoints that survive a crash.

One loop serves training from scratch and the fine-tuning between pruning steps: AdamW, a cosine
or step schedule per phase, the task's loss, AMP (bfloat16 if the GPU supports it, else float16
with a GradScaler) and channels_last on GPUs, tqdm progress and a line per epoch on stderr,
seeds. After every epoch the model (model.safetensors: the weights and the pruning plan) and
then the resume point (train_state.pt: the same weights and plan, the optimizer, scaler, epoch,
history and RNG) are each written to a temporary file and renamed over the old one, so a crash
never leaves a half-written file, and ``resume`` continues from the last whole epoch from
train_state.pt alone: a kill between the two writes cannot pair a model with another
optimizer state.
Under torchrun (engine.distributed) it trains through DistributedDataParallel on each process's
share of every global batch, and rank 0 alone writes checkpoints.

Pruning loops (iterative pruning, sweeps) use the Trainer through the FineTuner protocol: fit,
evaluate, the learning rate, a fresh start, checkpoints paused; never its internals.
"""

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol, Union

import numpy as np
import torch

from .. import _io
from . import distributed
from .._modes import evaluating
from .._progress import progress
from ..structure.plan import PruningPlan, load, read_plan, save
from .task import Task


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
    # BatchNorm statistics over the global batch under torchrun (SyncBatchNorm; GPUs only).
    # Without it each process normalises by its own share's statistics, and evaluation, scoring
    # and checkpoints use rank 0's running statistics.
    sync_batchnorm: bool = False


class FineTuner(Protocol):
    """What pruning loops need from a training loop (Trainer is one)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    plan: PruningPlan
    task: Task
    device: torch.device
    train_loader: Iterable
    progress: bool

    def fit(self, epochs: int, *, phase: str = "train") -> list[dict]: ...

    def evaluate(self) -> dict[str, float]: ...

    def epochs_done(self, phase: str) -> int: ...

    def set_learning_rate(self, lr: float) -> None: ...

    def restart(self, lr: Optional[float] = None) -> None: ...

    def checkpoints_paused(self) -> contextlib.AbstractContextManager: ...


class Trainer:
    """A model, its task and data, one optimizer for its whole life (training, then every pruning
    step's fine-tuning: pruning compacts its state), and a checkpoint directory."""

    def __init__(self, model: torch.nn.Module, task: Task, train_set: torch.utils.data.Dataset,
                 val_set: torch.utils.data.Dataset, config: TrainConfig, *,
                 device: Union[str, torch.device] = "cpu", out_dir: Union[str, Path, None] = None,
                 plan: Optional[PruningPlan] = None, progress: bool = True):
        self.device = torch.device(device)
        self.task, self.config, self.progress = task, config, progress and distributed.is_main()
        cuda = self.device.type == "cuda"
        if config.sync_batchnorm and distributed.active() and not cuda:
            raise ValueError("sync_batchnorm needs GPUs: torch's SyncBatchNorm runs on CUDA only")
        self.amp = cuda if config.amp is None else config.amp
        self.channels_last = cuda if config.channels_last is None else config.channels_last
        self.model = self._place(model)
        self.amp_dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler(enabled=self.amp and self.amp_dtype == torch.float16)
        self.optimizer = self._adamw(config.lr)
        # The same global batches on any number of processes: see distributed.sampler.
        self.train_loader = torch.utils.data.DataLoader(
            train_set, batch_size=distributed.local_batch_size(config.batch_size),
            sampler=distributed.sampler(train_set, config.seed),
            drop_last=len(train_set) > config.batch_size, num_workers=config.workers,
            generator=torch.Generator().manual_seed(config.seed + distributed.rank()))
        self.val_loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size,
                                                      num_workers=config.workers)
        size = train_set[0][0].shape[-1]
        self.plan = plan or PruningPlan.for_model(model, (1, 3, size, size))
        self.out_dir = Path(out_dir) if out_dir else None
        self.epoch, self.history = 0, []
        self._restarted_at = 0  # the shuffle of epoch e is seeded by e - this

    def _place(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.config.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _adamw(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.config.weight_decay)

    def batches(self, loader: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def fit(self, epochs: int, *, phase: str = "train") -> list[dict]:
        """Train ``epochs`` epochs with a fresh schedule over them, from the optimizer's rate when
        it was first fitted; validate and checkpoint after each. Returns the per-epoch records
        (also kept in ``self.history``)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"])
        schedule = self._schedule(max(1, epochs * len(self.train_loader)))
        net = distributed.wrap(self.model, self.device)  # anew: a prune changes what DDP holds
        records = []
        for _ in range(epochs):
            start = time.perf_counter()
            self.train_loader.sampler.set_epoch(self.epoch - self._restarted_at)
            self.model.train()
            total, count = 0.0, 0
            for x, y in progress(self.batches(self.train_loader), len(self.train_loader),
                                 self.progress, f"{phase} epoch {self.epoch + 1}"):
                with self.autocast():
                    loss = self.task.loss_fn(net(x).float(), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss is {loss.item()} at epoch {self.epoch + 1}")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                schedule.step()
                total, count = total + loss.item() * len(x), count + len(x)
            total, count = distributed.sum_over_ranks(total, count)
            distributed.broadcast_buffers(self.model)
            self.epoch += 1
            record = {"phase": phase, "epoch": self.epoch, "loss": total / max(count, 1), **self.evaluate()}
            records.append(record)
            self.history.append(record)
            self.save()
            print(f"{phase} epoch {self.epoch}: loss {record['loss']:.4f}, "
                  f"{self.task.headline} {record[self.task.headline]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        return records

    def _schedule(self, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        if self.config.schedule == "cosine":
            return torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        if self.config.schedule == "step":
            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 0.1 if s >= 2 * steps // 3 else 1)
        raise ValueError(f"schedule must be 'cosine' or 'step', got {self.config.schedule!r}")

    @torch.no_grad()
    def evaluate(self, loader: Optional[Iterable] = None) -> dict[str, float]:
        """The task's metrics on the validation set (or ``loader``); every submodule's mode is
        left as it was."""
        metrics = self.task.metrics()
        with evaluating(self.model):
            for x, y in self.batches(loader or self.val_loader):
                with self.autocast():
                    metrics.update(self.model(x).float(), y)
        return metrics.compute()

    # -- what pruning loops set --------------------------------------------------------------------

    def epochs_done(self, phase: str) -> int:
        """Epochs of ``phase`` in the history (a resumed run finishes the rest)."""
        return sum(r["phase"] == phase for r in self.history)

    def set_learning_rate(self, lr: float) -> None:
        """Every later fit starts from ``lr`` (fine-tuning a trained model wants a smaller rate
        than training it); the optimizer and its state stay."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = lr

    def restart(self, lr: Optional[float] = None) -> None:
        """A fresh AdamW at ``lr`` (default: the training rate) and the random state the run
        started from (batch order, augmentations): each point of a sweep then fine-tunes from
        the same start, and a resumed sweep repeats the points it lost exactly."""
        self.optimizer = self._adamw(self.config.lr if lr is None else lr)
        seed_everything(self.config.seed + distributed.rank())
        self.train_loader.generator.manual_seed(self.config.seed + distributed.rank())
        self._restarted_at = self.epoch

    @contextlib.contextmanager
    def checkpoints_paused(self) -> Iterator[None]:
        """No checkpoint is written inside (while pruning masks are held, they would not load)."""
        saved, self.out_dir = self.out_dir, None
        try:
            yield
        finally:
            self.out_dir = saved

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self) -> None:
        """model.safetensors (weights and pruning plan), then train_state.pt (the resume point:
        the same weights and plan with the optimizer, scaler, epoch, history and RNG) in out_dir,
        each replaced whole; by rank 0 alone under torchrun."""
        if self.out_dir is None or not distributed.is_main():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save(self.out_dir / "model.safetensors", self.model, self.plan)
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        _io.save_torch({"model": weights, "plan": self.plan.to_json(),
                        "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                        "epoch": self.epoch, "history": json.dumps(self.history),
                        "config": json.dumps(dataclasses.asdict(self.config)),
                        "rng": torch.get_rng_state()}, self.out_dir / "train_state.pt")

    def resume(self) -> None:
        """Continue from out_dir's train_state.pt: the (possibly pruned) model, the optimizer's
        state, the epoch count and the history, all of one epoch."""
        if self.out_dir is None:
            raise ValueError("resume needs the out_dir the run wrote its checkpoints to")
        path = self.out_dir / "train_state.pt"
        try:
            state = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"nothing to resume: {path} does not exist") from None
        except Exception as error:  # a damaged file: zip or unpickling errors
            raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
        if "model" in state:
            plan = PruningPlan.from_json(state["plan"], path)
            model = plan.build(state["model"], path)
        else:  # written before train_state.pt held the model: it goes with model.safetensors
            plan, model = read_plan(self.out_dir / "model.safetensors"), load(self.out_dir / "model.safetensors")
        # The checkpoint may be pruned: its model, with a new optimizer loaded with its state.
        self.model, self.plan = self._place(model), plan
        self.optimizer = self._adamw(self.config.lr)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.history = state["epoch"], json.loads(state["history"])
        torch.set_rng_state(state["rng"])
