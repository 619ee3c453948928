"""Iterative structured pruning to a FLOPs or params target (Sapkota et al. 2023):
score over k batches -> remove a fraction of the remaining channels -> fine-tune -> repeat.

Each step is one row of the log (params, GFLOPs, validation Dice/IoU after fine-tuning and Dice
right after the prune, before it: what the criterion alone kept; latency); the same optimizer
trains throughout, its state compacted with the parameters; the trainer checkpoints the pruned
model (state_dict + pruning plan) after every fine-tuning epoch.
"""

import dataclasses
from typing import Callable, Optional

import torch

from .model_stats import model_stats
from .policy import cost, select_channels
from .scoring import score
from .surgery import prune_

CRITERIA = ("taylor", "l1", "l2", "bn_scale", "random")


@dataclasses.dataclass
class PruneConfig:
    target: str = "flops"  # what the reduction is of: "flops" or "params"
    reduction: float = 0.5  # remove this fraction of the unpruned model's target
    step: float = 0.2  # each step removes this fraction of the remaining prunable channels
    # Or exactly this many steps, each removing the same fraction of the target (FLOPs): every
    # criterion then gets the same schedule and fine-tuning budget, as comparisons need.
    steps: Optional[int] = None
    criterion: str = "taylor"  # or a data-free baseline: l1, l2, bn_scale, random
    grad: str = "normalized"  # TaylorFO gradient: normalized, loss or random
    reduce: str = "abs_sum"
    normalize_layers: bool = False  # each group's scores over their L2 norm (Molchanov et al. 2017)
    flops_weighted: bool = False  # scores over the FLOPs one channel costs: importance per FLOP
    score_batches: int = 8
    finetune_epochs: int = 2
    # AdamW's rate while fine-tuning, when it should differ from the training rate the optimizer
    # holds (a trained model wants a smaller one); None keeps the optimizer's own.
    finetune_lr: Optional[float] = None
    scope: str = "global"
    round_to: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.target not in ("flops", "params"):
            raise ValueError(f"target must be 'flops' or 'params', got {self.target!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0 < self.reduction < 1 or not 0 < self.step < 1:
            raise ValueError(f"reduction and step are fractions in (0, 1), got {self.reduction}, {self.step}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")


def _target_of(row, target):
    return row["params"] if target == "params" else row["gflops"] * 1e9


def iterative_prune(trainer, config: PruneConfig, *, measure: Optional[Callable] = None,
                    on_step: Optional[Callable] = None, rows: Optional[list] = None) -> list:
    """Prune ``trainer.model`` in place until its ``config.target`` is at most
    ``1 - config.reduction`` of what it was, fine-tuning after each step. ``measure(model)``
    returns extra columns for each row (latency, for example); ``on_step(rows)`` is called after
    each row (to write logs as they come). Returns the rows, the unpruned model first.

    To resume an interrupted run, pass the trainer after ``trainer.resume()`` and the rows logged
    so far: a step pruned but not logged finishes its fine-tuning epochs, and pruning goes on."""
    model = trainer.model
    example = torch.zeros(trainer.plan.input_shape, device=trainer.device)
    rows = list(rows or [])

    def add_row(step, removed_channels, dice_pruned=None):
        stats = model_stats(model, example)
        rows.append({"step": step, "params": stats.params, "gflops": stats.gflops,
                     "removed_channels": removed_channels, "dice_pruned": dice_pruned,
                     **trainer.evaluate(),
                     **(measure(model) if measure else {})})
        if on_step:
            on_step(rows)
        return stats

    if config.finetune_lr is not None:  # Trainer.fit starts each phase from initial_lr
        for group in trainer.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = config.finetune_lr
    if not rows:
        add_row(0, 0)
    goal = (1 - config.reduction) * _target_of(rows[0], config.target)
    step = rows[-1]["step"]
    stats = model_stats(model, example)
    if stats.params != rows[-1]["params"]:  # interrupted while fine-tuning step + 1
        step += 1
        done = sum(r["phase"] == f"prune step {step}" for r in trainer.history)
        trainer.fit(max(0, config.finetune_epochs - done), phase=f"prune step {step}")
        stats = add_row(step, None)
    while getattr(stats, config.target) > goal * (1 + 1e-9):
        step += 1
        scores = score(model, trainer.train_loader, loss_fn=trainer.loss_fn, grad=config.grad,
                       reduce=config.reduce, num_batches=config.score_batches,
                       criterion=config.criterion, example_input=example, seed=config.seed + step,
                       normalize_layers=config.normalize_layers, flops_weighted=config.flops_weighted,
                       progress=trainer.progress)
        analysis, full = scores.analysis, cost(scores.analysis)
        # policy's max_ratio bounds what all steps together take from a group
        options = dict(scope=config.scope, round_to=config.round_to,
                       original_sizes=trainer.plan.original_group_sizes(analysis))
        # The fraction of this model's target still to go (the cost model counts conv FLOPs,
        # model_stats all of them: fractions carry over between the two).
        left = 1 - goal / getattr(stats, config.target)
        if config.steps:
            amount = 1 - (1 - left) ** (1 / (config.steps - step + 1))
            keep = select_channels(analysis, scores.values, amount=amount, target=config.target, **options)
        else:
            keep = select_channels(analysis, scores.values, amount=config.step, target="channels", **options)
            if cost(analysis, {i: len(k) for i, k in keep.items()})[config.target] < (1 - left) * full[config.target]:
                keep = select_channels(analysis, scores.values, amount=left, target=config.target, **options)
        if not keep:
            raise RuntimeError(f"step {step} removes nothing: the limits stop short of the target")
        trainer.plan.steps.append(prune_(model, analysis, keep, trainer.optimizer))
        removed = sum(analysis.groups[i].size - len(k) for i, k in keep.items())
        dice_pruned = trainer.evaluate().get("dice")
        trainer.fit(config.finetune_epochs, phase=f"prune step {step}")
        stats = add_row(step, removed, dice_pruned)
    return rows
