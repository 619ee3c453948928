"""What a model costs: parameters, FLOPs of one forward pass, and parameters it never uses.

Pruning is judged by these numbers, so they come from what the model actually executes: one
forward pass is traced at the dispatcher (the level every aten op goes through) and
  - FLOPs are counted by torch.utils.flop_counter (2 per multiply-add of convs, transposed convs
    and matmuls; element-wise ops, norms and pooling count 0, as in the usual GFLOPs tables);
  - a parameter counts as used when any op reads its storage. smp's PSPNet builds encoder
    stages that its forward never calls (19.9M of PSPNet-resnet34's 21.4M parameters); those
    show up in `unused`, and drop_unused_ removes the submodules that hold them.
"""

import contextlib
import dataclasses
from typing import Any, Iterable

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .._inputs import check_materialized
from .._modes import evaluating


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

    def __init__(self) -> None:
        super().__init__()
        self.pointers: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for leaf in tree_leaves((args, kwargs or {})):
            if isinstance(leaf, torch.Tensor):
                self.pointers.add(leaf.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def forward_once(model: torch.nn.Module, example_input: Any,
                 *modes: contextlib.AbstractContextManager) -> Any:
    """model(example_input) once, in eval mode, without autograd and inside the context managers
    ``modes``; every submodule's mode is restored, so BatchNorm statistics and modes are left
    as they were. ``example_input`` is a tensor or a tuple of positional arguments."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with evaluating(model), torch.no_grad(), contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        return model(*args)


def _trace(model: torch.nn.Module, example_input: Any,
           *modes: contextlib.AbstractContextManager) -> tuple[set[int], set[torch.nn.Module]]:
    """One forward pass (forward_once, inside ``modes``): the storage pointers every op read, and
    the modules that were called."""
    reads, called = _StorageReads(), set[torch.nn.Module]()
    hook = register_module_forward_pre_hook(lambda module, args: called.add(module))
    try:
        forward_once(model, example_input, reads, *modes)
    finally:
        hook.remove()
    return reads.pointers, called


def _is_read(tensor: torch.Tensor, pointers: set[int]) -> bool:
    return tensor.untyped_storage().data_ptr() in pointers


def model_stats(model: torch.nn.Module, example_input: Any) -> ModelStats:
    """Params, FLOPs and unused parameters of ``model`` on ``example_input`` (a tensor, or a tuple
    of positional arguments), from one forward pass (see forward_once). FLOPs scale with the
    input's batch and spatial size: pass the size the model will run at.
    """
    check_materialized(model)
    named = dict(model.named_parameters())
    flop_counter = FlopCounterMode(display=False)
    reads, _ = _trace(model, example_input, flop_counter)
    unused = tuple(n for n, p in named.items() if not _is_read(p, reads))
    params = sum(p.numel() for p in named.values())
    return ModelStats(
        params=params,
        used_params=params - sum(named[n].numel() for n in unused),
        flops=flop_counter.get_total_flops(),
        unused=unused,
    )


class Dropped(torch.nn.Module):
    """Stands where drop_unused_ removed a submodule: no parameters, and calling it raises."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{self.path} was removed by drop_unused_ because the traced forward "
                           "never called it; this forward takes a path the traced one did not")

    def extra_repr(self) -> str:
        return repr(self.path)


def drop_unused_(model: torch.nn.Module, example_input: Any) -> list[str]:
    """Replace with Dropped every maximal submodule of ``model`` that one forward pass on
    ``example_input`` (see forward_once) never calls and whose parameters and buffers (at least
    one) it never reads, e.g. the encoder stages smp's PSPNet and DeepLab build but never call.
    Returns their dotted paths, sorted.

    A module that is called stays, even if some of its parameters are unused (they remain in
    model_stats(...).unused). The pass runs in eval mode, so a branch taken only in training, or
    only for other inputs, looks unused: that is why the replacement is Dropped, which raises
    naming the module, and not Identity, which would make such a forward silently wrong.
    """
    check_materialized(model)
    reads, called = _trace(model, example_input)

    def droppable(module: torch.nn.Module, path: str) -> list[str]:
        tensors = [*module.parameters(), *module.buffers()]
        if (path and tensors and not any(m in called for m in module.modules())
                and not any(_is_read(t, reads) for t in tensors)):
            return [path]
        return [p for name, child in module.named_children()
                for p in droppable(child, f"{path}.{name}" if path else name)]

    names = sorted(droppable(model, ""))
    drop_(model, names)
    return names


def drop_(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Replace the submodules at the dotted paths ``names`` with Dropped (for replaying a plan)."""
    for name in names:
        parent, _, leaf = name.rpartition(".")
        try:
            model.get_submodule(name)
        except AttributeError:
            leaf = ""
        if not leaf:
            raise ValueError(f"cannot drop {name!r}: the model has no such submodule")
        setattr(model.get_submodule(parent), leaf, Dropped(name))
