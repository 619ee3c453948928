"""Saving and loading pruned models without pickled modules.

A pruned model is saved as its plain state_dict (safetensors, or a torch file that opens with
``torch.load(weights_only=True)``) beside a small JSON pruning plan: the example input shape, the
base model's constructor (for smp models), and each step: the channels a pruning step kept, or the
submodules a drop step replaced with Dropped (see drop_unused_step_). Loading builds
the base model, replays the steps (analysis is deterministic, and each step checks it finds the
groups it was made for, so a plan applied to another base model fails clearly), then loads the
weights. Opening a checkpoint never runs code from it.
"""

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from .dependency import analyze
from .model_stats import drop_, drop_unused_
from .surgery import prune_

FORMAT = "polyprune-plan/1"


@dataclasses.dataclass
class PruningPlan:
    input_shape: list  # the example input the analyses ran on, e.g. [1, 3, 352, 352]
    base: Optional[dict] = None  # {"arch": "Unet", "kwargs": {...}} for smp models, else None
    # in order: what prune_ returned, or {"drop": [module paths]} (drop_unused_step_)
    steps: list = dataclasses.field(default_factory=list)

    @classmethod
    def for_model(cls, model: torch.nn.Module, input_shape) -> "PruningPlan":
        """An empty plan; for smp models and NucleiNet it records how to rebuild the base model."""
        config = getattr(model, "_hub_mixin_config", None)  # smp keeps its constructor arguments
        base = None
        if config is not None and type(model).__module__.startswith("segmentation_models_pytorch"):
            base = {"arch": type(model).__name__, "kwargs": json.loads(json.dumps(dict(config)))}
        elif type(model).__name__ == "NucleiNet" and hasattr(model, "spec"):  # polyprune_ext.nuclei
            base = {"arch": "NucleiNet", "kwargs": dict(model.spec)}
        return cls(list(input_shape), base)

    def original_group_sizes(self, analysis) -> Optional[list]:
        """The channel group sizes before the first prune step, which policy.select_channels
        needs to bound what all steps together remove; None before any step, or (with a
        warning) where the model's groups no longer match them one to one: a group cut down to
        one channel can split from a depthwise conv that follows it."""
        sizes = next((step["group_sizes"] for step in self.steps if "group_sizes" in step), None)
        if sizes is not None and len(sizes) != len(analysis.groups):
            warnings.warn(f"the model now has {len(analysis.groups)} channel groups, not the "
                          f"{len(sizes)} it started with: max_ratio bounds this step alone")
            return None
        return sizes


def drop_unused_step_(model: torch.nn.Module, plan: PruningPlan) -> list:
    """model_stats.drop_unused_ on an input of the plan's shape, recorded in the plan as the step
    ``{"drop": names}``; returns the names."""
    names = drop_unused_(model, torch.zeros(plan.input_shape))
    plan.steps.append({"drop": names})
    return names


def replay_(model: torch.nn.Module, plan: PruningPlan) -> torch.nn.Module:
    """Apply the plan's steps to an unpruned base model, in place."""
    example = torch.zeros(plan.input_shape)
    for number, step in enumerate(plan.steps):
        if "drop" in step:
            try:
                drop_(model, step["drop"])
            except ValueError as error:
                raise ValueError(f"pruning plan step {number}: {error}. Is it the same base model?") from None
            continue
        analysis = analyze(model, example, ignore=())  # ignore limits choices, not structure
        sizes = [g.size for g in analysis.groups]
        if sizes != step["group_sizes"]:
            raise ValueError(
                f"pruning plan step {number} was made for a model with {len(step['group_sizes'])} "
                f"channel groups of sizes {step['group_sizes']}; this model has {len(sizes)} groups "
                f"of sizes {sizes}. Is it the same base model?")
        prune_(model, analysis, {int(i): k for i, k in step["keep"].items()})
    return model


def build_base(plan: PruningPlan) -> torch.nn.Module:
    if plan.base is None:
        raise ValueError("this plan records no smp constructor: pass the unpruned base model")
    if plan.base["arch"] == "NucleiNet":
        from .nuclei import NucleiNet

        return NucleiNet(**plan.base["kwargs"])
    import segmentation_models_pytorch as smp

    kwargs = dict(plan.base["kwargs"], encoder_weights=None)  # the weights come from the checkpoint
    return getattr(smp, plan.base["arch"])(**kwargs)


def plan_path(path) -> Path:
    return Path(str(path) + ".plan.json")


def save(path, model: torch.nn.Module, plan: PruningPlan) -> None:
    """Write ``path`` (``.safetensors``, or a torch file otherwise) and ``path + '.plan.json'``.
    Each file is written to a temporary name and renamed, so a crash leaves no half-written file."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights_tmp = path.with_name(path.name + ".tmp")
    plan_tmp = plan_path(path).with_name(plan_path(path).name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(weights_tmp))
    else:
        torch.save(state, weights_tmp)
    plan_tmp.write_text(json.dumps({"format": FORMAT, **dataclasses.asdict(plan)}, indent=1))
    weights_tmp.replace(path)
    plan_tmp.replace(plan_path(path))


def read_plan(path) -> PruningPlan:
    """The pruning plan saved beside the weights at ``path``."""
    record = json.loads(plan_path(path).read_text())
    if record.pop("format", None) != FORMAT:
        raise ValueError(f"{plan_path(path)} is not a {FORMAT} file")
    return PruningPlan(**record)


def load(path, base_model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """The pruned model saved at ``path``: ``base_model`` (unpruned; built from the plan for smp
    models when not given) with the plan replayed and the weights loaded."""
    path = Path(path)
    plan = read_plan(path)
    model = replay_(base_model if base_model is not None else build_base(plan), plan)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True, map_location="cpu")
    model.load_state_dict(state)
    return model
