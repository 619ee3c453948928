"""Iterative structured pruning to a FLOPs, params or latency target (Sapkota et al. 2023):
score over k batches -> remove a fraction of the remaining channels -> re-estimate the BatchNorm
statistics -> fine-tune -> repeat.

Each step is one row of the log: params, GFLOPs (and the predicted latency for a latency
target), the task's headline metric right after the prune (what the criterion alone kept),
after re-calibrating the BatchNorms, and the task's metrics after fine-tuning. The same
optimizer trains throughout, its state compacted with the parameters; the trainer checkpoints
the pruned model (weights + pruning plan) after every fine-tuning epoch.

Latency is measured once, by the latency model of the unpruned network on the trainer's device
at the plan's input shape (structure.latency; cached on disk), and predicted for every step.
"""

import dataclasses
from typing import Any, Callable, Optional

from .. import choices
from ..batchnorm import recalibrate_bn
from ..choices import Criterion, Grad, MixingNorms, Reduce, Scope
from ..scoring import Scores, baseline_scores, score
from ..structure.analysis import Analysis, analyze
from ..structure.latency import LatencyModel, latency_model
from ..structure.policy import cost, select_channels
from ..structure.stats import model_stats
from .trainer import FineTuner

Row = dict[str, Any]
TARGETS = ("flops", "params", "latency")


@dataclasses.dataclass
class PruneConfig:
    target: str = "flops"  # what the amount is of: "flops", "params" or "latency" (predicted)
    amount: float = 0.5  # remove this fraction of the unpruned model's target
    step: float = 0.2  # each step removes this fraction of the remaining prunable channels
    # Or exactly this many steps, each removing the same fraction of the target: every criterion
    # then gets the same schedule and fine-tuning budget, as comparisons need.
    steps: Optional[int] = None
    criterion: Criterion = "taylor"  # or a data-free baseline: l1, l2, bn_scale, random
    grad: Grad = "normalized"  # TaylorFO's gradient: normalized, loss or random
    reduce: Reduce = "abs_sum"
    normalize_layers: bool = False  # each group's scores over their L2 norm (Molchanov et al. 2017)
    flops_weighted: bool = False  # scores over the FLOPs one channel costs: importance per FLOP
    score_batches: int = 8
    # Training images the BatchNorm statistics are re-estimated on after each prune (0: never).
    bn_recal_images: int = 256
    finetune_epochs: int = 2
    # AdamW's rate while fine-tuning, when it should differ from the training rate the optimizer
    # holds (a trained model wants a smaller one); None keeps the optimizer's own.
    finetune_lr: Optional[float] = None
    scope: Scope = "global"
    round_to: Optional[int] = None  # None: 1, or for a latency target the device's, measured
    # For a latency target, the deployment: its thread count and input side (default: the
    # torch thread count and the plan's input).
    latency_threads: Optional[int] = None
    latency_size: Optional[int] = None
    # "prune": channels of norms that mix them (ConvNeXt's layer norms) go too (structure.analyze)
    mixing_norms: MixingNorms = "freeze"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0 < self.amount < 1 or not 0 < self.step < 1:
            raise ValueError(f"amount and step are fractions in (0, 1), got {self.amount}, {self.step}")
        if self.bn_recal_images < 0:
            raise ValueError(f"bn_recal_images must be 0 (off) or more, got {self.bn_recal_images}")
        choices.check("criterion", self.criterion, Criterion)
        choices.check("grad", self.grad, Grad)
        choices.check("reduce", self.reduce, Reduce)
        choices.check("scope", self.scope, Scope)
        choices.check("mixing_norms", self.mixing_norms, MixingNorms)


def iterative_prune(tuner: FineTuner, config: PruneConfig, *,
                    on_step: Optional[Callable[[list[Row]], None]] = None,
                    rows: Optional[list[Row]] = None) -> list[Row]:
    """Prune ``tuner.model`` in place until its ``config.target`` is at most
    ``1 - config.amount`` of what it was, fine-tuning after each step. ``on_step(rows)`` is
    called after each row (to write logs as they come). Returns the rows, the unpruned model
    first.

    To resume an interrupted run, pass the trainer after ``trainer.resume()`` and the rows logged
    so far: a step pruned but not logged finishes its fine-tuning epochs, and pruning goes on."""
    run = _Run(tuner, config, list(rows or []), on_step)
    if config.finetune_lr is not None:
        tuner.set_learning_rate(config.finetune_lr)
    if not run.rows:
        run.add_row(0, 0)
    goal = (1 - config.amount) * run.rows[0][run.column]
    step = run.rows[-1]["step"]
    if model_stats(tuner.model, run.example).params != run.rows[-1]["params"]:
        step += 1  # interrupted while fine-tuning this step: finish it
        phase = f"prune step {step}"
        tuner.fit(max(0, config.finetune_epochs - tuner.epochs_done(phase)), phase=phase)
        run.add_row(step, removed_channels(tuner.plan.steps[-1]))
    while run.rows[-1][run.column] > goal * (1 + 1e-9):
        step += 1
        removed = run.prune(step, left=1 - goal / run.rows[-1][run.column])
        measured = after_prune(tuner, config.bn_recal_images)
        tuner.fit(config.finetune_epochs, phase=f"prune step {step}")
        run.add_row(step, removed, measured)
    return run.rows


class _Run:
    """The state of one iterative pruning run: the tuner, the config, the rows logged, and for a
    latency target the latency model (measured once, on the first model it sees)."""

    def __init__(self, tuner: FineTuner, config: PruneConfig, rows: list[Row],
                 on_step: Optional[Callable[[list[Row]], None]]):
        self.tuner, self.config, self.rows, self.on_step = tuner, config, rows, on_step
        self.example = tuner.plan.example_input(tuner.device)
        self.latency: Optional[LatencyModel] = None
        if config.target == "latency":
            deployed = self.example
            if config.latency_size:
                deployed = deployed.new_zeros(*deployed.shape[:2], *[config.latency_size] * (deployed.dim() - 2))
            self.latency = latency_model(tuner.model, analyze(tuner.model, deployed), deployed,
                                         device=str(tuner.device), threads=config.latency_threads)
        self.column = {"flops": "gflops", "params": "params", "latency": "predicted_ms"}[config.target]

    def current_latency(self, analysis: Optional[Analysis] = None) -> Optional[LatencyModel]:
        if self.latency is None:
            return None
        return self.latency.rebind(analysis or analyze(self.tuner.model, self.example), self.tuner.model)

    def add_row(self, step: int, removed_channels: int, measured: Optional[Row] = None) -> None:
        stats = model_stats(self.tuner.model, self.example)
        row: Row = {"step": step, "params": stats.params, "gflops": stats.gflops,
                    "removed_channels": removed_channels}
        latency = self.current_latency()
        if latency is not None:
            row["predicted_ms"] = latency.predict()
        self.rows.append({**row, **(measured or {}), **self.tuner.evaluate()})
        if self.on_step:
            self.on_step(self.rows)

    def prune(self, step: int, left: float) -> int:
        """Score and prune once; ``left`` is the fraction of this model's target still to go
        (the cost model counts conv FLOPs, model_stats all of them: fractions carry over between
        the two). Returns the number of channels removed."""
        config, tuner = self.config, self.tuner
        scores = step_scores(tuner, config, step)
        analysis = scores.analysis
        latency = self.current_latency(analysis)
        round_to = config.round_to or (latency.round_to if latency is not None else 1)
        # policy's max_ratio bounds what all steps together take from a group
        options: dict[str, Any] = dict(scope=config.scope, round_to=round_to, latency=latency,
                                       original_sizes=tuner.plan.original_group_sizes(analysis))
        if config.steps:
            amount = 1 - (1 - left) ** (1 / (config.steps - step + 1))
            keep = select_channels(analysis, scores.values, amount=amount, target=config.target, **options)
        else:
            keep = select_channels(analysis, scores.values, amount=config.step, target="channels", **options)
            full = cost(analysis, latency=latency)[config.target]
            if cost(analysis, {i: len(k) for i, k in keep.items()}, latency)[config.target] < (1 - left) * full:
                keep = select_channels(analysis, scores.values, amount=left, target=config.target, **options)
        if not keep:
            raise ValueError(f"step {step} removes nothing: the limits (round_to, max_ratio, one channel "
                             "per group) stop short of the target; lower the amount or round_to")
        return removed_channels(tuner.plan.prune_(tuner.model, analysis, keep, tuner.optimizer))


def after_prune(tuner: FineTuner, bn_recal_images: int) -> Row:
    """The headline metric right after a prune and, unless ``bn_recal_images`` is 0, after
    re-estimating the BatchNorm statistics on that many training images."""
    headline = tuner.task.headline
    measured = {f"{headline}_pruned": tuner.evaluate()[headline]}
    if bn_recal_images and recalibrate_bn(tuner.model, tuner.train_loader, bn_recal_images):
        measured[f"{headline}_recalibrated"] = tuner.evaluate()[headline]
    return measured


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



def removed_channels(plan_step: dict) -> int:
    """The channels a pruning plan's prune step removed (a resumed run logs its last step's)."""
    return sum(plan_step["group_sizes"][int(i)] - len(k) for i, k in plan_step["keep"].items())
