"""Physically removing channels: every tensor slot of the chosen groups compacted in place.

Given an Analysis (polyprune_ext.structure.analysis) and, for some prunable groups, the channels to keep,
each affected parameter or buffer dim is compacted with polyprune_ext.ops.compact_ (so
Parameters, their .grad and the optimizer's state stay the same objects), and the modules'
channel attributes are updated so that repr and a new analysis see the new sizes.
"""

import collections
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

from .. import ops
from .spaces import Gate

if TYPE_CHECKING:
    from .analysis import Analysis


def prune_(model: torch.nn.Module, analysis: "Analysis", keep: Mapping[int, Any],
           optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
    """Keep, for each group index ``i`` in ``keep``, the channels ``keep[i]`` of
    ``analysis.groups[i]`` (sorted unique indices), and remove the rest from ``model`` in place.

    Returns the step as plain data, for a pruning plan (PruningPlan.prune_ calls this and
    records it): the group sizes it was made for, the channels kept, and the analysis's
    mixing_norms when not the default."""
    kept = collections.defaultdict(list)  # (tensor name, dim) -> kept indices of each group in it
    covered = collections.defaultdict(list)  # (tensor name, dim) -> every group's indices in it
    for i, group in enumerate(analysis.groups):
        if i in keep:
            analysis.check_prunable(i)
        channels = torch.as_tensor(keep[i], dtype=torch.int64) if i in keep else torch.arange(group.size)
        if i in keep and channels.numel() == 0:
            raise ValueError(f"group {i}: keep at least one channel")
        if i in keep and not whole_runs(channels, group.unit):
            raise ValueError(f"group {i} goes in runs of {group.unit} channels (whole group "
                             "norm groups): keep whole runs")
        for slot in group.slots:
            kept[(slot.name, slot.dim)].append(slot.offset + channels)
            covered[(slot.name, slot.dim)].append(slot.offset + torch.arange(group.size))
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for (name, dim), parts in kept.items():
        tensor = tensors[name]
        # Every channel of a pruned dim must belong to exactly one group, or the analysis is wrong.
        if not torch.equal(torch.cat(covered[(name, dim)]).sort().values, torch.arange(tensor.shape[dim])):
            raise RuntimeError(f"channel groups do not cover dim {dim} of {name} exactly once")
        indices = torch.cat(parts).sort().values
        if indices.numel() == tensor.shape[dim]:
            continue
        if isinstance(tensor, torch.nn.Parameter):
            ops.compact_parameter_(tensor, indices, dim, optimizer)
        else:
            ops.compact_(tensor, indices, dim)
    update_module_attributes(model)
    set_attributes(model, analysis, keep)
    step = {"group_sizes": [g.size for g in analysis.groups],
            "keep": {str(i): torch.as_tensor(k).tolist() for i, k in sorted(keep.items())}}
    return step if analysis.mixing_norms == "freeze" else {**step, "mixing_norms": analysis.mixing_norms}


def whole_runs(channels: torch.Tensor, unit: int) -> bool:
    """Whether sorted channel indices are whole aligned runs of ``unit``."""
    if channels.numel() % unit:
        return False
    runs = channels.view(-1, unit)
    return bool((runs[:, 0] % unit == 0).all()) and torch.equal(runs - runs[:, :1], torch.arange(unit).expand_as(runs))


def update_module_attributes(model: torch.nn.Module) -> None:
    """Channel counts of convs and linear layers read back from their (compacted) weights."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if depthwise:
                m.groups = m.weight.shape[0]
            if m.transposed:
                m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
            else:
                m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, torch.nn.Linear):
            m.out_features, m.in_features = m.weight.shape


def set_attributes(model: torch.nn.Module, analysis: "Analysis", keep: Mapping[int, Any]) -> None:
    """The module attributes that hold channel counts (Analysis.attributes: norms' channel and
    group counts, split sizes, a functional depthwise conv's channels) set to the kept counts."""
    for a in analysis.attributes:
        counts = [sum(len(keep[i]) if i in keep else analysis.groups[i].size for i in piece) // a.per
                  for piece in a.pieces]
        module = model.get_submodule(a.module)
        setattr(module, a.name, type(getattr(module, a.name))(counts) if a.listed else counts[0])


def zero_channels(model: torch.nn.Module, analysis: "Analysis",
                  drop: Mapping[int, Any]) -> list[torch.utils.hooks.RemovableHandle]:
    """Simulate a prune without changing any tensor: forward hooks zero the channels ``drop[i]``
    of group ``i`` at every gate of the group. The model then computes what the model pruned of
    those channels computes (the tests' proof of the analysis), and the channels can be put back
    by removing the returned hook handles."""
    handles = []
    for i, channels in drop.items():
        group = analysis.groups[i]
        channels = torch.as_tensor(channels, dtype=torch.int64)
        for gate in group.gates:
            def zero(module: torch.nn.Module, inputs: Any, out: torch.Tensor, gate: Gate = gate,
                     channels: torch.Tensor = channels) -> torch.Tensor:
                return out.index_fill(gate.dim, (gate.offset + channels).to(out.device), 0)
            handles.append(model.get_submodule(gate.module).register_forward_hook(zero))
    return handles
