"""The applications built on the library: each task (polyp segmentation, nuclei instance
segmentation) gives the engine its data, model, loss and metrics (engine.task.Task)."""

import importlib

from ..engine.task import Task
from ..structure.plan import PruningPlan

NAMES = ("polyp", "nuclei")


def get_task(name: str) -> Task:
    """The task called ``name``; importing it registers its model family for checkpoints."""
    if name not in NAMES:
        raise ValueError(f"unknown task {name!r}; choose one of {NAMES}")
    return importlib.import_module(f"{__name__}.{name}").TASK


def task_of(plan: PruningPlan) -> Task:
    """The task whose models a checkpoint's plan holds."""
    family = plan.base["family"] if plan.base else None
    for name in NAMES:
        task = get_task(name)
        if family in task.families:
            return task
    raise ValueError(f"the checkpoint holds a model of family {family!r}, which no task trains")
