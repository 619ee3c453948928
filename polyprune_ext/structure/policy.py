"""Which channels to remove: a target (channels, parameters, FLOPs or latency, as a fraction to
remove or a budget to reach), a scope (one global ranking, or the same ratio in every group) and
per-group limits.

Costs are computed from the Analysis, not by pruning trial copies: every parameter's new size
follows from how many channels each group keeps in each of its dims, and every convolution's and
linear layer's FLOPs are its FLOPs per weight element (recorded on the example input) times its
new weight size. Both are exact for the layers, norms and their parameters the analysis follows,
including a weight whose input and output channels both shrink. Latency is predicted by a
latency model measured on the device (structure.latency).
"""

import math
import warnings
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .. import choices
from ..choices import Scope, Target

if TYPE_CHECKING:  # analysis imports this module (through trial)
    from .analysis import Analysis
    from .latency import LatencyModel


def shapes_after(analysis: "Analysis", kept: dict[int, int]) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter and buffer after keeping ``kept[i]`` channels of group ``i``
    (every channel of the groups not named)."""
    dim_sizes: dict[tuple[str, int], int] = {}  # (tensor, dim) -> its size after pruning
    for i, group in enumerate(analysis.groups):
        for slot in group.slots:
            key = (slot.name, slot.dim)
            dim_sizes[key] = dim_sizes.get(key, 0) + kept.get(i, group.size)
    return {name: tuple(dim_sizes.get((name, d), n) for d, n in enumerate(shape))
            for name, shape in analysis.shapes.items()}


def cost(analysis: "Analysis", kept: Optional[dict[int, int]] = None,
         latency: Optional["LatencyModel"] = None) -> dict[str, float]:
    """Params, conv and linear FLOPs and prunable channels of the model after keeping ``kept[i]``
    channels of group ``i`` (every channel of the groups not named), and its predicted latency
    in ms when a ``latency`` model (structure.latency) is given."""
    kept = kept or {}
    numel = {name: math.prod(shape) for name, shape in shapes_after(analysis, kept).items()}
    costs: dict[str, float] = {
        "params": sum(n for name, n in numel.items() if name not in analysis.buffers),
        "flops": sum(f * numel[name] for name, f in analysis.flops_per_weight.items()),
        "channels": sum(kept.get(i, g.size) for i, g in enumerate(analysis.groups) if g.prunable),
    }
    if latency is not None:
        costs["latency"] = latency.predict(kept)
    return costs


def select_channels(analysis: "Analysis", scores: dict[int, torch.Tensor], *,
                    amount: Optional[float] = None, at_most: Optional[float] = None,
                    target: Target = "flops", scope: Scope = "global", min_channels: int = 1,
                    max_ratio: float = 0.9, round_to: int = 1,
                    original_sizes: Optional[Sequence[int]] = None,
                    latency: Optional["LatencyModel"] = None) -> dict[int, torch.Tensor]:
    """The channels to keep, ``{group index: sorted indices}``, removing at least ``amount``
    (0 to 1) of the model's ``target`` ("channels" of prunable groups, "params", conv and linear
    "flops", or "latency" predicted by the ``latency`` model), or as much as leaves at most
    ``at_most`` of it (a budget: 2e9 FLOPs, 1000 channels, 20 ms), lowest ``scores[i]`` (one score
    per channel of group ``i``) first. For a latency target the ranking is by score per
    millisecond a channel's removal saves (a greedy knapsack, as HALP's, Shen et al. 2022): the
    most latency for the least score.

    scope "global" ranks every channel of every scored group together (scores must be comparable
    across groups); "layer" removes the same fraction from each group. No group keeps fewer
    than ``min_channels`` channels or loses more than ``max_ratio`` of them, and each keeps a
    multiple of ``round_to`` channels (8 suits tensor cores) unless that exceeds its size. Where the
    limits stop short of the target, the most they allow is returned, with a warning. A group
    whose channels go in runs (``ChannelGroup.unit``: whole group norm groups) keeps whole runs,
    a multiple of both the run and ``round_to``; a run is ranked by its channels' mean score,
    what it is worth per channel removed.

    ``original_sizes`` (the unpruned model's group sizes, in group order) makes ``max_ratio`` bound
    what all pruning steps together remove: without it, each of several steps could remove 90% of
    what the last one left, and a layer would shrink to a single channel.
    """
    choices.check("target", target, Target)
    choices.check("scope", scope, Scope)
    if target == "latency" and latency is None:
        raise ValueError("target='latency' needs a latency model: latency=latency_model(model, ...)")
    if (amount is None) == (at_most is None):
        raise ValueError("give either amount (the fraction to remove) or at_most (a budget)")
    if at_most is not None:
        if not 0 < at_most:
            raise ValueError(f"at_most is the {target} to keep, above 0; got {at_most}")
        amount = max(0.0, 1 - at_most / cost(analysis, latency=latency)[target])
    assert amount is not None
    if not 0 <= amount < 1:
        raise ValueError(f"amount is the fraction to remove, in [0, 1); got {amount}")
    if original_sizes is not None and len(original_sizes) != len(analysis.groups):
        raise ValueError(f"original_sizes has {len(original_sizes)} groups, the model "
                         f"{len(analysis.groups)}: it must come from the same model before pruning")
    saved = latency.per_channel() if target == "latency" and latency is not None else {}
    groups, ranking = {}, []  # ranking: (score, group) of every scored channel, lowest first
    for i, s in scores.items():
        analysis.check_prunable(i)
        group = analysis.groups[i]
        s = torch.as_tensor(s, dtype=torch.float64).flatten()
        if s.numel() != group.size:
            raise ValueError(f"scores[{i}] has {s.numel()} values for a group of {group.size} channels")
        original = group.size if original_sizes is None else original_sizes[i]
        floor = min(group.size, max(min_channels, math.ceil(original * (1 - max_ratio))))
        runs = s.view(-1, group.unit).mean(1)
        best = runs.argsort(descending=True)  # best first, run by run
        groups[i] = ((best[:, None] * group.unit + torch.arange(group.unit)).flatten(), floor)
        if target == "latency":  # score per ms saved; a group whose removal saves nothing, last
            runs = runs / saved[i] if saved[i] > 0 else torch.full_like(runs, math.inf)
        ranking += [(float(v), i) for v in runs]
    ranking.sort()
    full = cost(analysis, latency=latency)[target]

    def kept_counts(step: int, steps: int) -> dict:
        if scope == "global":  # the `step` lowest-scored runs of the ranking go
            removed = dict.fromkeys(groups, 0)
            for _, i in ranking[:step]:
                removed[i] += analysis.groups[i].unit
        else:
            removed = {i: analysis.groups[i].size * step // steps for i in groups}
        counts = {}
        for i, (_, floor) in groups.items():
            size, multiple = analysis.groups[i].size, math.lcm(analysis.groups[i].unit, round_to)
            k = max(floor, size - removed[i])
            counts[i] = min(size, math.ceil(k / multiple) * multiple)
        return counts

    def reached(step: int, steps: int) -> bool:
        return cost(analysis, kept_counts(step, steps), latency)[target] <= (1 - amount) * full

    steps = len(ranking) if scope == "global" else 1000
    low, high = 0, steps  # the smallest step that reaches the target, by bisection
    if not reached(high, steps):
        warnings.warn(f"the limits allow removing only "
                      f"{1 - cost(analysis, kept_counts(high, steps), latency)[target] / full:.1%} of the "
                      f"{target}, short of {amount:.1%}", stacklevel=2)
        low = high
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if reached(middle, steps) else (middle + 1, high)
    counts = kept_counts(low, steps)
    return {i: groups[i][0][:k].sort().values for i, k in counts.items() if k < analysis.groups[i].size}
