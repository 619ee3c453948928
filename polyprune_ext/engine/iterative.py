"""Iterative structured pruning to a FLOPs or params target (Sapkota et al. 2023):
score over k batches -> remove a fraction of the remaining channels -> fine-tune -> repeat.

Each step is one row of the log (params, GFLOPs, the task's metrics after fine-tuning, the
headline metric right after the prune, before it: what the criterion alone kept; latency); the
same optimizer trains throughout, its state compacted with the parameters; the trainer
checkpoints the pruned model (weights + pruning plan) after every fine-tuning epoch.
"""

import dataclasses
from typing import Any, Callable, Optional

import torch

from .. import choices
from ..choices import Criterion, Grad, MixingNorms, Reduce, Scope
from ..scoring import Scores, baseline_scores, score
from ..structure.analysis import analyze
from ..structure.policy import cost, select_channels
from ..structure.stats import ModelStats, model_stats
from .trainer import FineTuner

Row = dict[str, Any]


@dataclasses.dataclass
class PruneConfig:
    target: str = "flops"  # what the amount is of: "flops" or "params"
    amount: float = 0.5  # remove this fraction of the unpruned model's target
    step: float = 0.2  # each step removes this fraction of the remaining prunable channels
    # Or exactly this many steps, each removing the same fraction of the target (FLOPs): every
    # criterion then gets the same schedule and fine-tuning budget, as comparisons need.
    steps: Optional[int] = None
    criterion: Criterion = "taylor"  # or a data-free baseline: l1, l2, bn_scale, random
    grad: Grad = "normalized"  # TaylorFO's gradient: normalized, loss or random
    reduce: Reduce = "abs_sum"
    normalize_layers: bool = False  # each group's scores over their L2 norm (Molchanov et al. 2017)
    flops_weighted: bool = False  # scores over the FLOPs one channel costs: importance per FLOP
    score_batches: int = 8
    finetune_epochs: int = 2
    # AdamW's rate while fine-tuning, when it should differ from the training rate the optimizer
    # holds (a trained model wants a smaller one); None keeps the optimizer's own.
    finetune_lr: Optional[float] = None
    scope: Scope = "global"
    round_to: int = 1
    # "prune": channels of norms that mix them (ConvNeXt's layer norms) go too (structure.analyze)
    mixing_norms: MixingNorms = "freeze"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in ("flops", "params"):
            raise ValueError(f"target must be 'flops' or 'params', got {self.target!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0 < self.amount < 1 or not 0 < self.step < 1:
            raise ValueError(f"amount and step are fractions in (0, 1), got {self.amount}, {self.step}")
        choices.check("criterion", self.criterion, Criterion)
        choices.check("grad", self.grad, Grad)
        choices.check("reduce", self.reduce, Reduce)
        choices.check("scope", self.scope, Scope)
        choices.check("mixing_norms", self.mixing_norms, MixingNorms)


def iterative_prune(tuner: FineTuner, config: PruneConfig, *,
                    measure: Optional[Callable[[torch.nn.Module], Row]] = None,
                    on_step: Optional[Callable[[list[Row]], None]] = None,
                    rows: Optional[list[Row]] = None) -> list[Row]:
    """Prune ``tuner.model`` in place until its ``config.target`` is at most
    ``1 - config.amount`` of what it was, fine-tuning after each step. ``measure(model)``
    returns extra columns for each row (latency, for example); ``on_step(rows)`` is called after
    each row (to write logs as they come). Returns the rows, the unpruned model first.

    To resume an interrupted run, pass the trainer after ``trainer.resume()`` and the rows logged
    so far: a step pruned but not logged finishes its fine-tuning epochs, and pruning goes on."""
    model, example = tuner.model, tuner.plan.example_input(tuner.device)
    rows = list(rows or [])

    def add_row(step: int, removed_channels: Optional[int], pruned: Optional[float] = None) -> ModelStats:
        stats = model_stats(model, example)
        rows.append({"step": step, "params": stats.params, "gflops": stats.gflops,
                     "removed_channels": removed_channels, f"{tuner.task.headline}_pruned": pruned,
                     **tuner.evaluate(), **(measure(model) if measure else {})})
        if on_step:
            on_step(rows)
        return stats

    if config.finetune_lr is not None:
        tuner.set_learning_rate(config.finetune_lr)
    if not rows:
        add_row(0, 0)
    goal = (1 - config.amount) * _target_of(rows[0], config.target)
    step = rows[-1]["step"]
    stats = model_stats(model, example)
    if stats.params != rows[-1]["params"]:  # interrupted while fine-tuning step + 1
        step += 1
        phase = f"prune step {step}"
        tuner.fit(max(0, config.finetune_epochs - tuner.epochs_done(phase)), phase=phase)
        stats = add_row(step, None)
    while getattr(stats, config.target) > goal * (1 + 1e-9):
        step += 1
        removed = _prune_step(tuner, config, step, left=1 - goal / getattr(stats, config.target))
        pruned = tuner.evaluate()[tuner.task.headline]
        tuner.fit(config.finetune_epochs, phase=f"prune step {step}")
        stats = add_row(step, removed, pruned)
    return rows


def _target_of(row: Row, target: str) -> float:
    return row["params"] if target == "params" else row["gflops"] * 1e9


def step_scores(tuner: FineTuner, config: PruneConfig, step: int) -> Scores:
    """This step's scores by ``config.criterion``, on ``config.score_batches`` training batches."""
    analysis = analyze(tuner.model, tuner.plan.example_input(tuner.device),
                       mixing_norms=config.mixing_norms)
    weighting = dict(normalize_layers=config.normalize_layers, flops_weighted=config.flops_weighted)
    if config.criterion != "taylor":
        return baseline_scores(tuner.model, config.criterion, analysis=analysis,
                               seed=config.seed + step, **weighting)
    return score(tuner.model, tuner.train_loader, loss_fn=tuner.task.loss_fn, grad=config.grad,
                 reduce=config.reduce, num_batches=config.score_batches, analysis=analysis,
                 seed=config.seed + step, progress=tuner.progress, **weighting)


def _prune_step(tuner: FineTuner, config: PruneConfig, step: int, left: float) -> int:
    """Score and prune once; ``left`` is the fraction of this model's target still to go (the
    cost model counts conv FLOPs, model_stats all of them: fractions carry over between the
    two). Returns the number of channels removed."""
    scores = step_scores(tuner, config, step)
    analysis, full = scores.analysis, cost(scores.analysis)
    # policy's max_ratio bounds what all steps together take from a group
    options: dict[str, Any] = dict(scope=config.scope, round_to=config.round_to,
                                   original_sizes=tuner.plan.original_group_sizes(analysis))
    if config.steps:
        amount = 1 - (1 - left) ** (1 / (config.steps - step + 1))
        keep = select_channels(analysis, scores.values, amount=amount, target=config.target, **options)
    else:
        keep = select_channels(analysis, scores.values, amount=config.step, target="channels", **options)
        if cost(analysis, {i: len(k) for i, k in keep.items()})[config.target] < (1 - left) * full[config.target]:
            keep = select_channels(analysis, scores.values, amount=left, target=config.target, **options)
    if not keep:
        raise RuntimeError(f"step {step} removes nothing: the limits stop short of the target")
    tuner.plan.prune_(tuner.model, analysis, keep, tuner.optimizer)
    return sum(analysis.groups[i].size - len(k) for i, k in keep.items())
