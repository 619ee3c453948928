"""What every criterion returns, and the weighting applied to its scores before ranking."""

import dataclasses
from typing import Any

import torch

from ..structure.analysis import Analysis
from ..structure.policy import cost


@dataclasses.dataclass
class Scores:
    """One score per channel of every prunable group; higher = more important."""

    values: dict[int, torch.Tensor]  # group index -> per-channel score (float64, CPU)
    analysis: Analysis  # the analysis the group indices refer to
    batches: int = 0  # batches scored (TaylorFO)
    skipped_batches: int = 0  # with NaN or Inf (nonfinite="skip")
    skipped_samples: int = 0  # whose output gradient was zero


def weigh_scores(values: dict[int, torch.Tensor], analysis: Analysis, normalize_layers: bool,
                 flops_weighted: bool) -> dict[int, torch.Tensor]:
    """``values`` (in place) divided by each group's L2 norm, then by one channel's FLOPs; shared
    by every criterion and the Pruner. Normalisation comes first: the FLOPs divisor is one number
    per group, which normalising afterwards would cancel."""
    if normalize_layers:
        for i, v in values.items():
            norm = v[torch.isfinite(v)].norm()
            values[i] = v / norm if norm > 0 else v
    if flops_weighted:
        full = cost(analysis)["flops"]
        for i in values:
            per_channel = full - cost(analysis, {i: analysis.groups[i].size - 1})["flops"]
            values[i] = values[i] / max(per_channel, 1)
    return values


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters; a clear error for a model without any."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters: there is "
                         "nothing to score or prune")
    if parameter.device.type == "meta":
        raise ValueError("the model is on the meta device (no values): materialise it "
                         "(model.to_empty(device=...) and load weights) before scoring or pruning")
    return parameter.device


def split_batch(batch: Any, needs_target: bool) -> tuple[torch.Tensor, Any]:
    """(inputs, targets) from what a loader yielded: (images, targets) pairs, dicts with "image"
    (and "mask"), or image tensors (no targets: ``needs_target`` False)."""
    if isinstance(batch, torch.Tensor):
        if needs_target:
            raise TypeError("the loader yielded a tensor, but this gradient mode needs a loss: "
                            "yield (images, targets) pairs, or use grad='random'")
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1]
    if isinstance(batch, dict) and "image" in batch:
        if needs_target and batch.get("mask") is None:
            raise TypeError("the loader yielded a dict with 'image' but no 'mask', and this "
                            "gradient mode needs a loss: yield dicts with 'image' and 'mask', "
                            "(images, targets) pairs, or use grad='random'")
        return batch["image"], batch.get("mask")
    raise TypeError(f"the loader yielded {type(batch).__name__}; expected (images, targets) pairs "
                    "(tuples or lists), a dict with 'image' and 'mask', or image tensors with "
                    "grad='random'")
