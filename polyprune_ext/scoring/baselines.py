"""Data-free baseline criteria: what TaylorFO is compared against.

"l1" and "l2": the norm of every weight of a channel, over all the group's slots (the filter,
its norm parameters, the consumers' input weights); "bn_scale": |gamma| of its norms (groups
with no norm get +inf, never chosen); "random": uniform scores from a seeded generator.
"""

import math
from typing import Any, Optional

import torch

from .. import choices
from .._inputs import device_of
from ..choices import Baseline
from ..structure.analysis import Analysis, analyze
from .scores import Scores, weigh_scores


def baseline_scores(model: torch.nn.Module, criterion: Baseline, *,
                    analysis: Optional[Analysis] = None, example_input: Any = None,
                    normalize_layers: bool = False, flops_weighted: bool = False,
                    seed: int = 0) -> Scores:
    """A score per channel of every prunable group of ``model`` by ``criterion`` (see the module
    docstring), from the weights alone; weighted as in polyprune_ext.score. Needs ``analysis``
    or an ``example_input`` to make one."""
    choices.check("criterion", criterion, Baseline)
    device = device_of(model)
    if analysis is None:
        if example_input is None:
            raise ValueError("pass analysis, or an example_input to analyse the model")
        analysis = analyze(model, example_input.to(device))
    if not analysis.prunable:
        raise ValueError("the model has no prunable channel groups; analysis report:\n"
                         + analysis.report())
    values = weight_scores(model, analysis, criterion, seed)
    return Scores(weigh_scores(values, analysis, normalize_layers, flops_weighted), analysis)


def weight_scores(model: torch.nn.Module, analysis: Analysis, criterion: Baseline,
                  seed: int = 0) -> dict[int, torch.Tensor]:
    """{group index: per-channel score} of a baseline criterion, unweighted."""
    params = dict(model.named_parameters())
    norms = {f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm))}
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for i, group in enumerate(analysis.groups):
        if not group.prunable:
            continue
        if criterion == "random":
            values[i] = torch.rand(group.size, generator=generator, dtype=torch.float64)
            continue
        total = torch.zeros(group.size, dtype=torch.float64)
        found = False
        for slot in group.slots:
            if slot.name not in params or criterion == "bn_scale" and slot.name not in norms:
                continue
            found = True
            w = params[slot.name].detach().double().cpu().narrow(slot.dim, slot.offset, group.size)
            w = w.movedim(slot.dim, 0).reshape(group.size, -1)
            total += w.square().sum(1) if criterion == "l2" else w.abs().sum(1)
        if criterion == "l2":
            total = total.sqrt()
        values[i] = total if found or criterion != "bn_scale" else torch.full_like(total, math.inf)
    return values
