"""What every entry point that runs a model on data needs: where the model lives, and the
inputs (and targets) in a batch as loaders yield them."""

from typing import Any

import torch


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
