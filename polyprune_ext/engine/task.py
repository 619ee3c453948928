"""An application as the engine sees it: its data, model, loss and metrics.

The training loop, iterative pruning, sweeps, reports and the command line are written once
against a Task; polyprune_ext.tasks defines the polyp and nuclei tasks.
"""

import dataclasses
from typing import Any, Callable, Optional, Protocol

import torch


class Metrics(Protocol):
    """Accumulates predictions batch by batch; compute() gives {metric key: value}."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None: ...

    def compute(self) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric as tables and plots show it."""

    key: str  # in Metrics.compute()
    title: str
    higher_is_better: bool = True


@dataclasses.dataclass(frozen=True)
class Task:
    """``datasets(source, size=, val_count=, seed=, count=, verify=, allow_resize_masks=)`` gives
    the (train, val) sets of a folder (``verify``: every file decoded and every target's size
    checked first; ``allow_resize_masks``: targets of another size than their image resized,
    not refused), or of the synthetic stand-in when ``source`` is None (``count`` items; train
    augmented); ``build_model(arch, encoder, encoder_weights=, **model_args)`` an unpruned
    model; ``loss_fn(output, target)`` and ``metrics()`` train and judge it; ``reported`` are the
    metrics tables show, the headline first."""

    name: str
    datasets: Callable[..., tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]]
    build_model: Callable[..., torch.nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metrics: Callable[[], Metrics]
    reported: tuple[Metric, ...]
    size: int  # default input side, pixels
    synthetic_count: int  # items in the default synthetic set
    families: tuple[str, ...]  # the model families (polyprune_ext.models) its checkpoints hold

    @property
    def headline(self) -> str:
        return self.reported[0].key

    def load_data(self, source: Optional[str], *, size: int, val_count: Optional[int] = None,
                  seed: int = 0, count: Optional[int] = None, verify: bool = False,
                  allow_resize_masks: bool = False) -> tuple[Any, Any]:
        """(train, val) from a folder (see ``datasets`` for ``verify`` and
        ``allow_resize_masks``), or from the synthetic set when ``source`` is None or
        "synthetic"."""
        if source is None or source == "synthetic":
            return self.datasets(None, size=size, val_count=val_count, seed=seed,
                                 count=count or self.synthetic_count)
        return self.datasets(source, size=size, val_count=val_count, seed=seed, verify=verify,
                             allow_resize_masks=allow_resize_masks)
