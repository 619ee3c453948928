"""Nuclei instance segmentation (after Mahbod et al. 2022): a two-branch network (mask and
distance map), watershed instances, Dice/MSE/AJI/PQ; DSB 2018 and label-image folders."""

from ...engine.task import Metric, Task
from .data import DSB2018Folder, LabelFolder, SyntheticNuclei, nuclei_dataset, synthetic_nuclei
from .instances import (InstanceMetrics, aji, instance_targets, panoptic_quality,
                        watershed_instances)
from .model import NucleiMetrics, NucleiNet, NucleiTargets, nuclei_datasets, nuclei_loss

TASK = Task(
    name="nuclei",
    datasets=nuclei_datasets,
    build_model=NucleiNet,
    loss_fn=nuclei_loss,
    metrics=NucleiMetrics,
    reported=(Metric("dice", "semantic Dice"), Metric("mse", "regression MSE", higher_is_better=False),
              Metric("aji", "instance AJI"), Metric("pq", "instance PQ")),
    size=256,
    synthetic_count=200,
    families=("nuclei",),
)

__all__ = ["DSB2018Folder", "InstanceMetrics", "LabelFolder", "NucleiMetrics", "NucleiNet",
           "NucleiTargets", "SyntheticNuclei", "TASK", "aji", "instance_targets", "nuclei_dataset",
           "nuclei_datasets", "nuclei_loss", "panoptic_quality", "synthetic_nuclei",
           "watershed_instances"]
