"""Polyp segmentation (colonoscopy frames, Kvasir-SEG / CVC-ClinicDB folders): one binary mask
per frame, an smp or MONAI model, Dice+BCE, Dice/IoU/precision/recall."""

from typing import Optional

import torch

from ...engine.task import Metric, Task
from ...models import named_model
from ..metrics import BinarySegmentationMetrics, dice_bce_loss
from .data import PolypFolder, SyntheticPolyps, polyp_dataset, synthetic_polyp


def polyp_datasets(source: Optional[str], *, size: int, val_count: Optional[int] = None,
                   seed: int = 0, count: int = 240, verify: bool = False,
                   allow_resize_masks: bool = False) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, val) of a folder, or of ``count`` synthetic polyps when ``source`` is None or
    "synthetic"; the train split is augmented. For a folder, ``verify`` decodes every file and
    checks every mask's size first (PolypFolder.verify), and ``allow_resize_masks`` stretches
    masks of another size than their image rather than refuse them."""
    common: dict = dict(size=size, val_count=val_count, seed=seed)
    if source is None or source == "synthetic":
        common["count"] = count
    else:
        common["allow_resize_masks"] = allow_resize_masks
        if verify:
            PolypFolder(source, **common).verify()
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
