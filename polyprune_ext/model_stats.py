"""What a model costs: parameters, FLOPs of one forward pass, and parameters it never uses.

Pruning is judged by these numbers, so they come from what the model actually executes: one
forward pass is traced at the dispatcher (the level every aten op goes through) and
  - FLOPs are counted by torch.utils.flop_counter (2 per multiply-add of convs, transposed convs
    and matmuls; element-wise ops, norms and pooling count 0, as in the usual GFLOPs tables);
  - a parameter counts as used when any op reads its storage. smp's PSPNet builds encoder
    stages that its forward never calls (19.9M of PSPNet-resnet34's 21.4M parameters); those
    show up in `unused`.
"""

import contextlib
import dataclasses
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


@dataclasses.dataclass(frozen=True)
class ModelStats:
    params: int  # every parameter element of the model
    used_params: int  # those the forward pass reads
    flops: int  # of one forward pass on the example input
    unused: tuple[str, ...]  # names of the parameters the forward pass never reads

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


class _StorageReads(TorchDispatchMode):
    """Records the storage of every tensor any op receives."""

    def __init__(self):
        super().__init__()
        self.pointers = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for leaf in tree_leaves((args, kwargs or {})):
            if isinstance(leaf, torch.Tensor):
                self.pointers.add(leaf.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def forward_once(model: torch.nn.Module, example_input: Any, *modes) -> Any:
    """model(example_input) once, in eval mode, without autograd and inside the context managers
    ``modes``; the model's training flag is restored, so BatchNorm statistics and mode are left
    as they were. ``example_input`` is a tensor or a tuple of positional arguments."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            return model(*args)
    finally:
        model.train(was_training)


def model_stats(model: torch.nn.Module, example_input: Any) -> ModelStats:
    """Params, FLOPs and unused parameters of ``model`` on ``example_input`` (a tensor, or a tuple
    of positional arguments), from one forward pass (see forward_once). FLOPs scale with the
    input's batch and spatial size: pass the size the model will run at.
    """
    named = dict(model.named_parameters())
    flop_counter, reads = FlopCounterMode(display=False), _StorageReads()
    forward_once(model, example_input, flop_counter, reads)
    unused = tuple(n for n, p in named.items() if p.untyped_storage().data_ptr() not in reads.pointers)
    params = sum(p.numel() for p in named.values())
    return ModelStats(
        params=params,
        used_params=params - sum(named[n].numel() for n in unused),
        flops=flop_counter.get_total_flops(),
        unused=unused,
    )
