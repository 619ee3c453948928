"""Pruning plans, and pruned models saved and loaded without pickled modules.

A plan records how a pruned model came from its base: the base model's family and constructor
arguments (polyprune_ext.models), the example input shape the analyses ran on, and each step:
the channels a prune kept, or the submodules a drop replaced with Dropped. It records its own
steps (``plan.prune_``, ``plan.drop_unused_``). Loading builds the base model, replays the
steps (analysis is deterministic, and each step checks it finds the groups it was made for, so
a plan applied to another base model fails clearly), then loads the weights. Opening a
checkpoint never runs code from it.

A ``.safetensors`` checkpoint is one file: the plan lives in its metadata, and the file is
written under a temporary name and renamed, so a crash leaves the old checkpoint or the new
one, never a mix. A torch file (any other suffix) is a plain state_dict that opens with
``torch.load(weights_only=True)``, with the plan beside it in ``<path>.plan.json``, written
first.
"""

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .. import _io, models
from .._inputs import check_materialized
from .analysis import Analysis, analyze
from .stats import drop_, drop_unused_
from .surgery import prune_

FORMAT = "polyprune-plan/2"
METADATA_KEY = "polyprune_plan"
PathLike = Union[str, Path]


@dataclasses.dataclass
class PruningPlan:
    input_shape: list[int]  # the example input the analyses ran on, e.g. [1, 3, 352, 352]
    base: Optional[dict] = None  # {"family": "smp", "kwargs": {...}} (models.describe), or None
    # in order: {"group_sizes": [...], "keep": {group: [channels]}} (and "mixing_norms": "prune"
    # when the analysis pruned through channel-mixing norms) or {"drop": [module paths]}
    steps: list[dict] = dataclasses.field(default_factory=list)

    @classmethod
    def for_model(cls, model: torch.nn.Module, input_shape: Sequence[int]) -> "PruningPlan":
        """An empty plan; it records how to rebuild ``model`` when a registered model family
        built it (smp, the tasks' models, your own: polyprune_ext.register_model_family)."""
        return cls(list(input_shape), models.describe(model))

    def example_input(self, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        return torch.zeros(self.input_shape, device=device)

    def prune_(self, model: torch.nn.Module, analysis: Analysis, keep: dict,
               optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """Keep, for each group index ``i`` in ``keep``, the channels ``keep[i]`` and remove the
        rest from ``model`` in place (structure.surgery.prune_; the optimizer's state follows),
        and record the step. A ``keep`` that removes nothing records nothing. Returns the step."""
        step = prune_(model, analysis, keep, optimizer)
        if any(torch.as_tensor(k).numel() < analysis.groups[int(i)].size for i, k in keep.items()):
            self.steps.append(step)
        return step

    def drop_unused_(self, model: torch.nn.Module) -> list[str]:
        """structure.stats.drop_unused_ on an input of the plan's shape, recorded as the step
        ``{"drop": names}`` when it drops something; returns the names."""
        parameter = next(model.parameters(), None)
        names = drop_unused_(model, self.example_input(parameter.device if parameter is not None else None))
        if names:
            self.steps.append({"drop": names})
        return names

    def original_group_sizes(self, analysis: Analysis) -> Optional[list[int]]:
        """The channel group sizes before the first prune step, which policy.select_channels
        needs to bound what all steps together remove; None before any step, or (with a
        warning) where the model's groups no longer match them one to one: a group cut down to
        one channel can split from a depthwise conv that follows it."""
        sizes = next((step["group_sizes"] for step in self.steps if "group_sizes" in step), None)
        if sizes is not None and len(sizes) != len(analysis.groups):
            warnings.warn(f"the model now has {len(analysis.groups)} channel groups, not the "
                          f"{len(sizes)} it started with: max_ratio bounds this step alone", stacklevel=2)
            return None
        return sizes

    def replay_(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply the steps to an unpruned base model, in place."""
        example = self.example_input()
        for number, step in enumerate(self.steps):
            if "drop" in step:
                try:
                    drop_(model, step["drop"])
                except ValueError as error:
                    raise ValueError(f"pruning plan step {number}: {error}. Is it the same base "
                                     "model?") from None
                continue
            analysis = analyze(model, example, ignore=(),  # ignore limits choices, not structure
                               mixing_norms=step.get("mixing_norms", "freeze"))
            sizes = [g.size for g in analysis.groups]
            if sizes != step["group_sizes"]:
                raise ValueError(f"pruning plan step {number} was made for a model with "
                                 f"{_differences(step['group_sizes'], sizes)}. Is it the same "
                                 "base model?")
            prune_(model, analysis, {int(i): k for i, k in step["keep"].items()})
        return model

    def build(self, state: dict[str, torch.Tensor], where: PathLike,
              base_model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
        """The pruned model: ``base_model`` (unpruned; rebuilt from the plan's model family when
        not given) with the steps replayed and the weights ``state`` loaded. Errors name
        ``where`` and say which disagrees: the plan and the base model, or the weights and both
        (load_weights_)."""
        if base_model is None:
            if self.base is None:
                raise ValueError(f"{where}: the plan records no registered model family: pass "
                                 "the unpruned base model")
            base_model = models.build(self.base)
        try:
            model = self.replay_(base_model)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        load_weights_(model, state, where)
        return model

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, text: str, where: PathLike) -> "PruningPlan":
        """The plan in ``text`` (read from ``where``, named in errors); plans of format 1,
        which named smp architectures directly, are read too."""
        try:
            record = json.loads(text)
            version = record.pop("format", None)
            if version == "polyprune-plan/1" and record.get("base"):
                base = record["base"]
                family = "nuclei" if base["arch"] == "NucleiNet" else "smp"
                kwargs = base["kwargs"] if family == "nuclei" else {"arch": base["arch"], **base["kwargs"]}
                record["base"] = {"family": family, "kwargs": kwargs}
            elif version not in (FORMAT, "polyprune-plan/1"):
                raise ValueError(f"format {version!r}, expected {FORMAT!r}")
            return cls(**record)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{where} does not hold a readable pruning plan: {error}") from None


def plan_path(path: PathLike) -> Path:
    """Where a torch-file checkpoint keeps its plan."""
    return Path(str(path) + ".plan.json")


def save(path: PathLike, model: torch.nn.Module, plan: PruningPlan) -> None:
    """Write the model's state_dict and its plan to ``path``: one ``.safetensors`` file with the
    plan in its metadata, or a torch file with the plan in ``path + '.plan.json'``. Every file
    is replaced whole (a temporary name, then a rename)."""
    path = Path(path)
    check_materialized(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        _io.replace_atomically(path, lambda tmp: save_file(
            state, str(tmp), metadata={METADATA_KEY: plan.to_json()}))
    else:
        _io.write_text(plan_path(path), plan.to_json())
        _io.replace_atomically(path, lambda tmp: torch.save(state, tmp))


def read_plan(path: PathLike) -> PruningPlan:
    """The pruning plan of the checkpoint at ``path`` (in its metadata, or beside it)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        text = _safetensors_metadata(path).get(METADATA_KEY)
        if text is not None:
            return PruningPlan.from_json(text, path)
    if not plan_path(path).exists():  # older safetensors checkpoints kept it beside them too
        raise ValueError(f"{path} has no pruning plan: it was not written by polyprune_ext.save")
    return PruningPlan.from_json(plan_path(path).read_text(), plan_path(path))


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); it may be "
                         "truncated or overwritten") from None


def load(path: PathLike, base_model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """The pruned model saved at ``path``: ``base_model`` (unpruned; rebuilt from the plan's
    model family when not given) with the plan replayed and the weights loaded."""
    path = Path(path)
    return read_plan(path).build(_read_weights(path), path, base_model)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors, zip, unpickling errors: the file is damaged
        raise ValueError(f"{path}: the weights cannot be read ({type(error).__name__}: {error}); "
                         "the file may be truncated or overwritten") from None


def load_weights_(model: torch.nn.Module, state: dict[str, torch.Tensor], where: PathLike) -> None:
    """``model.load_state_dict(state)``, with a refusal that names ``where`` and says in one line
    what disagrees: tensors missing or unexpected (the weights are of another architecture than
    the model) or of other shapes (pruned otherwise than the model was), with a few examples."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        counts = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
                  for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]
        raise ValueError(f"{where}: the weights are of another architecture than the model its "
                         f"plan builds ({len(expected)} tensors): {'; '.join(counts)}")
    resized = [k for k in expected if state[k].shape != expected[k].shape]
    if resized:
        examples = ", ".join(f"{k}: {list(state[k].shape)} against {list(expected[k].shape)}"
                             for k in resized[:3])
        raise ValueError(f"{where}: the weights and the pruning plan disagree: {len(resized)} of "
                         f"{len(expected)} tensors have other shapes than the plan gives (e.g. "
                         f"{examples}); they come from different runs or pruning steps")
    model.load_state_dict(state)


def _differences(planned: Sequence[int], found: Sequence[int]) -> str:
    """The channel groups a plan step expects against those a model has, in a few words."""
    if len(planned) != len(found):
        return f"{len(planned)} channel groups; this model has {len(found)}"
    first = next(i for i, (a, b) in enumerate(zip(planned, found)) if a != b)
    return (f"channel groups of other sizes than this model's (group {first}: {planned[first]} "
            f"channels, this model {found[first]}; {sum(a != b for a, b in zip(planned, found))} "
            f"of {len(found)} groups differ)")
