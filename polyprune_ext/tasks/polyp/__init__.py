"""Polyp segmentation (colonoscopy frames, Kvasir-SEG / CVC-ClinicDB folders): one binary mask
per frame, an smp or MONAI model, Dice+BCE, Dice/IoU/precision/recall."""

from typing import Optional

import torch

from ...engine.task import Metric, Task
from ...models import named_model
from ..metrics import BinarySegmentationMetrics, dice_bce_loss
from .data import PolypFolder, SyntheticPolyps, polyp_dataset, synthetic_polyp


def polyp_datasets(source: Optional[str], *, size: int, val_count: Optional[int] = None,
                   seed: int = 0, count: int = 240) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, val) of a folder, or of ``count`` synthetic polyps when ``source`` is None; the
    train split is augmented."""
    common = dict(size=size, val_count=val_count, seed=seed)
    if source is None:
        common["count"] = count
    return (polyp_dataset(source, split="train", augment=True, **common),
            polyp_dataset(source, split="val", **common))


TASK = Task(
    name="polyp",
    datasets=polyp_datasets,
    build_model=named_model,
    loss_fn=dice_bce_loss,
    metrics=BinarySegmentationMetrics,
    reported=(Metric("dice", "Dice"), Metric("iou", "IoU")),
    size=352,
    synthetic_count=240,
    families=("smp", "monai"),
)

__all__ = ["PolypFolder", "SyntheticPolyps", "TASK", "polyp_dataset", "polyp_datasets",
           "synthetic_polyp"]
