"""A trial prune on the meta device: the groups whose removal would break the forward pass freeze.

The surgery sets every count the analysis understands: the layers' own, and the module attributes
it found holding channel counts (Analysis.attributes). A count it cannot see (a view's size
computed from another tensor's shape, as in MONAI's window attention, or a constant in the code)
would leave a pruned model that fails at its first forward. So analyze() runs the forward pass
again on the meta device (shapes alone: no memory, no arithmetic) with one run of every prunable
group removed; where it fails, halves of the groups are tried until the groups that break it are
found, and those freeze, the error their reason. A model whose forward pass cannot run on the meta
device (one that reads values: ``.item()``, ``nonzero``) is not checked.
"""

import copy
import itertools
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.utils._pytree import tree_map

from .policy import shapes_after
from .stats import forward_once
from .surgery import set_attributes, update_module_attributes

if TYPE_CHECKING:
    from .analysis import Analysis


def freeze_breaking(model: torch.nn.Module, example_input: Any, analysis: "Analysis") -> None:
    """Freeze the prunable groups of ``analysis`` whose removal breaks ``model``'s forward pass."""
    groups = [i for i, g in enumerate(analysis.groups) if g.prunable and g.size > g.unit]
    if not groups or breaks(model, example_input, analysis, []) is not None:
        return  # nothing to check, or not checkable on the meta device
    for i, error in breaking(model, example_input, analysis, groups).items():
        analysis.groups[i].frozen.append(f"removing its channels breaks the forward pass ({error})")


def breaking(model: torch.nn.Module, example_input: Any, analysis: "Analysis",
             groups: list[int]) -> dict[int, str]:
    """{group: error} of the groups among ``groups`` whose removal breaks the forward pass, by
    halves; groups that break it only together are all named."""
    error = breaks(model, example_input, analysis, groups)
    if error is None:
        return {}
    if len(groups) == 1:
        return {groups[0]: error}
    half = len(groups) // 2
    found = {**breaking(model, example_input, analysis, groups[:half]),
             **breaking(model, example_input, analysis, groups[half:])}
    return found or dict.fromkeys(groups, error)


def breaks(model: torch.nn.Module, example_input: Any, analysis: "Analysis",
           groups: list[int]) -> Optional[str]:
    """The error of the forward pass, on the meta device, of ``model`` without the last run of
    each of ``groups``; None if it runs."""
    kept = {i: analysis.groups[i].size - analysis.groups[i].unit for i in groups}
    shapes = shapes_after(analysis, kept)
    memo: dict[int, Any] = {}  # each tensor copied as an empty one of its shape after the prune
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        meta = torch.empty(shapes.get(name, tensor.shape), dtype=tensor.dtype, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(meta, tensor.requires_grad) \
            if isinstance(tensor, torch.nn.Parameter) else meta
    trial = copy.deepcopy(model, memo)
    update_module_attributes(trial)
    set_attributes(trial, analysis, {i: range(k) for i, k in kept.items()})
    inputs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, example_input)
    try:
        forward_once(trial, inputs)
    except Exception as error:  # any failure is the answer
        return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    return None
