"""TaylorFO pruning inside an ordinary training loop.

    pruner = Pruner(model, optimizer, example_input=images[:1])
    for images, masks in loader:
        with pruner.scoring():            # scores accumulate during the usual step
            loss = loss_fn(model(images), masks)
            loss.backward()
        optimizer.step(); optimizer.zero_grad()
    pruner.prune(0.2, target="flops")      # the same optimizer goes on training the smaller model

In "normalized" mode the scores are those of gradient-normalized backpropagation, with no extra
backward: a hook on the model output reads dL/dy and gives the kernel the per-sample factor
1 / ||dL/dy_n|| (see polyprune_ext.scoring.taylor for when that is exact). With a GradScaler, that factor
also undoes the loss scale; in "loss" mode the scores are divided by the scale.

Under torch.distributed, scores are summed over ranks when read, so every rank prunes the same
channels. After prune() the parameters have new shapes: wrap the model in DistributedDataParallel
again (and recompile it) before training on.
"""

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from .._inputs import device_of
from ..batchnorm import recalibrate_bn
from ..choices import Backend, Grad, MixingNorms, NonFinite, Reduce, Scope, Target
from ..structure.analysis import analyze
from ..structure.latency import LatencyModel
from ..structure.plan import PruningPlan, save
from ..structure.policy import select_channels
from .scores import weigh_scores
from .taylor import TaylorAccumulator, per_sample_scale


class Pruner:
    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                 example_input: torch.Tensor, grad: Grad = "normalized", reduce: Reduce = "abs_sum",
                 backend: Backend = "fused", scaler: Optional[torch.amp.GradScaler] = None,
                 nonfinite: Optional[NonFinite] = None, normalize_layers: bool = False,
                 flops_weighted: bool = False, ignore: Optional[tuple[str, ...]] = None,
                 mixing_norms: MixingNorms = "freeze"):
        """``model`` (or a DistributedDataParallel wrapping it) and the ``optimizer`` whose state
        follows the pruned parameters. ``example_input``: one input batch (one image suffices)
        for the structure analysis. ``grad``: "normalized" or "loss" ("random" needs its own
        backward: use polyprune_ext.score). ``nonfinite``: "raise" on NaN/Inf, or "skip" such
        batches (the default when a GradScaler is given: its overflowing steps are skipped too).
        ``normalize_layers`` and ``flops_weighted`` weigh the scores as in polyprune_ext.score,
        when they are read (so after the all-reduce, and on the current analysis after a prune).
        ``ignore`` and ``mixing_norms``: as polyprune_ext.analyze takes them.
        """
        if grad not in ("normalized", "loss"):
            raise ValueError(f"grad must be 'normalized' or 'loss' inside training steps, got {grad!r}")
        self.module = getattr(model, "module", model)  # the model inside DDP
        self.optimizer, self.grad, self.scaler, self.ignore = optimizer, grad, scaler, ignore
        self.mixing_norms = mixing_norms
        self.normalize_layers, self.flops_weighted = normalize_layers, flops_weighted
        self.reduce, self.backend = reduce, backend
        self.nonfinite: NonFinite = nonfinite or ("skip" if scaler is not None else "raise")
        self.example_input = example_input[:1].detach()
        self.plan = PruningPlan.for_model(self.module, self.example_input.shape)
        self._analyze()

    def _analyze(self) -> None:
        device = device_of(self.module)
        self.analysis = analyze(self.module, self.example_input.to(device), self.ignore,
                                mixing_norms=self.mixing_norms)
        self.accumulator = TaylorAccumulator(self.module, self.analysis, reduce=self.reduce,
                                             backend=self.backend, nonfinite=self.nonfinite)

    @contextlib.contextmanager
    def scoring(self) -> Iterator["Pruner"]:
        """Around one training step's forward and backward: adds that batch to the scores."""
        def on_output(module: torch.nn.Module, inputs: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"the model returned {type(out).__name__}; scoring needs a tensor")
            if out.requires_grad:
                out.register_hook(self._set_scale)

        handle = self.module.register_forward_hook(on_output)
        try:
            with self.accumulator.attached():
                yield self
        finally:
            handle.remove()
        self.accumulator.end_batch()

    def _set_scale(self, grad_y: torch.Tensor) -> None:
        if self.grad == "normalized":
            scale, zeros = per_sample_scale(grad_y)
            self.accumulator.skipped_samples += zeros
        elif self.scaler is not None and self.scaler.is_enabled():
            scale = torch.full((grad_y.shape[0],), 1 / self.scaler.get_scale(), device=grad_y.device)
        else:
            scale = None
        self.accumulator.scale = scale

    def scores(self) -> dict[int, torch.Tensor]:
        """{group index: per-channel score} accumulated since the last prune, weighted as
        configured: what prune() ranks."""
        return weigh_scores(self.accumulator.scores(), self.analysis, self.normalize_layers,
                            self.flops_weighted)

    @property
    def stats(self) -> dict[str, int]:
        acc = self.accumulator
        return {"batches": acc.batches, "skipped_batches": acc.skipped_batches,
                "skipped_samples": acc.skipped_samples}

    def prune(self, amount: float, *, target: Target = "flops", scope: Scope = "global",
              min_channels: int = 1, max_ratio: float = 0.9, round_to: int = 1,
              latency: Optional[LatencyModel] = None, data: Optional[Iterable] = None,
              bn_recal_images: Optional[int] = 256) -> dict[str, Any]:
        """Remove the lowest-scoring channels: ``amount`` of the model's ``target`` (see
        policy.select_channels for the options and the ``latency`` model a latency target
        needs; ``max_ratio`` bounds all prunes together). With ``data`` (a loader of training
        batches), the BatchNorm statistics are then re-estimated on ``bn_recal_images`` of its
        images (batchnorm.recalibrate_bn; None: all). Resets the scores; returns the step (also
        recorded in ``self.plan``, which ``save`` writes with the weights)."""
        if self.accumulator.batches == 0:
            raise RuntimeError(f"no batch has been scored ({self.accumulator.skipped_batches} "
                               "skipped for NaN or Inf): run training steps inside "
                               "`with pruner.scoring():` first")
        original = self.plan.original_group_sizes(self.analysis)
        keep = select_channels(self.analysis, self.scores(), amount=amount, target=target,
                               scope=scope, min_channels=min_channels, max_ratio=max_ratio,
                               round_to=round_to, original_sizes=original,
                               latency=latency.rebind(self.analysis, self.module) if latency else None)
        step = self.plan.prune_(self.module, self.analysis, keep, self.optimizer)
        if data is not None and keep:
            recalibrate_bn(self.module, data, bn_recal_images)
        self._analyze()
        return step

    def save(self, path: Union[str, Path]) -> None:
        """The pruned model and its pruning plan (polyprune_ext.save)."""
        save(path, self.module, self.plan)
