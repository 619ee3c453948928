"""What the entry points check of the model and data they are given: a model with no values (on
the meta device) or, where one is needed, without parameters gets one clear ValueError rather
than a StopIteration or a torch error from deep inside; where the model lives; the inputs (and
targets) in a batch as loaders yield them."""

from typing import Any

import torch


def check_materialized(model: torch.nn.Module) -> None:
    """ValueError when a parameter or buffer of ``model`` is on the meta device: shapes without
    values, which nothing here can trace, score, prune or save."""
    if any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        raise ValueError(f"the model ({type(model).__name__}) is on the meta device (no values): "
                         "materialise it first (model.to_empty(device=...), then load weights)")


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters; ValueError for a model without any (nothing to
    score or prune) or on the meta device."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters: there is "
                         "nothing to score or prune")
    check_materialized(model)
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
