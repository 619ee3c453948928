"""What the entry points check of the model they are given: a model with no values (on the meta
device) or, where one is needed, without parameters gets one clear ValueError, rather than a
StopIteration or a torch error from deep inside."""

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
