"""Switching a model to eval mode for a while, and back: every submodule returns to its own mode
(a model in training whose encoder was frozen in eval mode stays that way)."""

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    modes = {m: m.training for m in model.modules()}
    try:
        yield model.eval()
    finally:
        for m, mode in modes.items():
            m.training = mode
