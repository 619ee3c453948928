"""The training engine the applications share: a Trainer with crash-safe checkpoints, iterative
structured pruning with fine-tuning, magnitude compression sweeps, and reports. It knows tasks
only through engine.task.Task, and pruning loops know the Trainer only through FineTuner."""

from .iterative import PruneConfig, iterative_prune
from .sweep import compression_sweep
from .task import Metric, Task
from .trainer import FineTuner, TrainConfig, Trainer, seed_everything

__all__ = ["FineTuner", "Metric", "PruneConfig", "Task", "TrainConfig", "Trainer",
           "compression_sweep", "iterative_prune", "seed_everything"]
