"""Unstructured magnitude pruning (after Mahbod et al. 2022): the smallest weights set to zero,
either the same fraction in every layer ("layer") or below one threshold for the whole network
("global").

Built on torch.nn.utils.prune: the masks stay on the modules while fine-tuning (pruned weights
stay zero), and make_permanent_ folds them into plain weights at the end, so the model saves as
an ordinary state_dict. Scope: the weights of convolutions and transposed convolutions;
first/last layers and biases are options. Zeros make the model smaller only in a compressed
checkpoint; a dense GPU runs it no faster.
"""

import torch
from torch.nn.utils import prune

from .. import choices
from .._inputs import check_materialized
from ..choices import Scope

CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
         torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


Tensors = list[tuple[torch.nn.Module, str]]


def prunable_tensors(model: torch.nn.Module, *, first: bool = True, last: bool = True,
                     biases: bool = False) -> Tensors:
    """(module, "weight" or "bias") of every convolution in the scope, in forward order."""
    convs = [m for m in model.modules() if isinstance(m, CONVS)]
    if not convs:
        raise ValueError("the model has no convolution to prune")
    chosen = convs[(0 if first else 1):(len(convs) if last else len(convs) - 1)]
    return [(m, name) for m in chosen for name in (("weight", "bias") if biases else ("weight",))
            if getattr(m, name, None) is not None]


def magnitude_prune_(model: torch.nn.Module, sparsity: float, *, scope: Scope = "global",
                     first: bool = True, last: bool = True, biases: bool = False) -> float:
    """Zero ``sparsity`` (0 to 1) of the weights in scope, by magnitude, in place (masks held
    until make_permanent_). Pruning again raises the sparsity of the remaining weights to
    ``sparsity`` overall (torch.nn.utils.prune composes masks). Returns the sparsity reached."""
    choices.check("scope", scope, Scope)
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity is the fraction of weights to zero, in [0, 1); got {sparsity}")
    check_materialized(model)
    tensors = prunable_tensors(model, first=first, last=last, biases=biases)
    # torch.nn.utils.prune takes the amount of the weights still unpruned: convert.
    done = sparsity_of(tensors)
    amount = 0.0 if done >= sparsity else (sparsity - done) / (1 - done)
    if scope == "global":
        prune.global_unstructured(tensors, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in tensors:
            prune.l1_unstructured(module, name, amount=amount)
    return sparsity_of(tensors)


def sparsity_of(tensors: Tensors) -> float:
    """Fraction of zeros over (module, name) tensors."""
    total = sum(getattr(m, n).numel() for m, n in tensors)
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in tensors)
    return zeros / total


def sparsity_for(compression_ratio: float) -> float:
    """The sparsity of a compression ratio CR = prunable weights / remaining weights (Mahbod et
    al. 2022): CR 16 is 93.75% of the weights pruned."""
    if compression_ratio < 1:
        raise ValueError(f"a compression ratio is at least 1, got {compression_ratio}")
    return 1 - 1 / compression_ratio


def permanent_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict make_permanent_ would leave, without touching the model: each pruned
    ``name_orig`` and ``name_mask`` pair folded into ``name``."""
    state = model.state_dict()
    for key in [k for k in state if k.endswith("_orig") and k[: -len("_orig")] + "_mask" in state]:
        name = key[: -len("_orig")]
        state[name] = state.pop(key) * state.pop(name + "_mask")
    return state


def hold_zeros_(model: torch.nn.Module, *, first: bool = True, last: bool = True,
                biases: bool = False) -> None:
    """Masks over the weights in scope that are zero now (a pruned checkpoint reloaded), so
    that fine-tuning keeps them zero and further pruning composes with them."""
    for module, name in prunable_tensors(model, first=first, last=last, biases=biases):
        prune.custom_from_mask(module, name, mask=getattr(module, name) != 0)


def make_permanent_(model: torch.nn.Module) -> None:
    """Fold every pruning mask into its weight (plain parameters again)."""
    for module in model.modules():
        for name in [h._tensor_name for h in module._forward_pre_hooks.values()
                     if isinstance(h, prune.BasePruningMethod)]:
            prune.remove(module, name)
