"""Model families a pruning plan can rebuild: the base model of a checkpoint is recorded as a
family name and constructor arguments (plain JSON, nothing pickled) and built again on load.

smp (segmentation_models_pytorch) is built in. Applications register their own models
(polyprune_ext.tasks.nuclei registers NucleiNet); users do the same for theirs:

    polyprune_ext.register_model_family(
        "mynet", build=MyNet, describe=lambda m: m.config if isinstance(m, MyNet) else None)
"""

import dataclasses
import json
from typing import Any, Callable, Optional

import torch


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """``build(**kwargs)`` makes an unpruned model; ``describe(model)`` returns the kwargs that
    rebuild ``model`` when this family made it, else None."""

    name: str
    build: Callable[..., torch.nn.Module]
    describe: Callable[[torch.nn.Module], Optional[dict]]


FAMILIES: dict[str, ModelFamily] = {}


def register_model_family(name: str, build: Callable[..., torch.nn.Module],
                          describe: Callable[[torch.nn.Module], Optional[dict]]) -> None:
    """Let pruning plans record and rebuild models of this family (see the module docstring)."""
    FAMILIES[name] = ModelFamily(name, build, describe)


def describe(model: torch.nn.Module) -> Optional[dict]:
    """``{"family": name, "kwargs": {...}}`` of the first registered family that built
    ``model``, as JSON-able data; None when no family knows it."""
    for family in FAMILIES.values():
        kwargs = family.describe(model)
        if kwargs is not None:
            return {"family": family.name, "kwargs": json.loads(json.dumps(kwargs))}
    return None


def build(base: dict) -> torch.nn.Module:
    """The unpruned model a plan's ``base`` (from describe) records."""
    family = FAMILIES.get(base["family"])
    if family is None:
        raise ValueError(f"the checkpoint's base model is of family {base['family']!r}, which is "
                         f"not registered (known: {sorted(FAMILIES)}); import the module that "
                         "registers it (polyprune_ext.tasks.nuclei for NucleiNet), or pass the "
                         "unpruned base model")
    return family.build(**base["kwargs"])


# -- smp ---------------------------------------------------------------------------------------


def smp_model(arch: str = "Unet", encoder: str = "resnet34", *, classes: int = 1,
              encoder_weights: Optional[str] = None, **kwargs: Any) -> torch.nn.Module:
    """An smp model by name. ``encoder_weights=None`` (the default) starts from random weights;
    "imagenet" downloads pretrained ones, which needs a machine that reaches the model hub."""
    import segmentation_models_pytorch as smp

    if not hasattr(smp, arch) or not isinstance(getattr(smp, arch), type):
        names = sorted(n for n in dir(smp) if isinstance(getattr(smp, n), type) and
                       issubclass(getattr(smp, n), torch.nn.Module) and n[0].isupper())
        raise ValueError(f"unknown smp architecture {arch!r}; choose one of {names}")
    if encoder not in smp.encoders.get_encoder_names() and not encoder.startswith("tu-"):
        raise ValueError(f"unknown smp encoder {encoder!r}; see smp.encoders.get_encoder_names()")
    return getattr(smp, arch)(encoder, encoder_weights=encoder_weights, classes=classes, **kwargs)


def _describe_smp(model: torch.nn.Module) -> Optional[dict]:
    config = getattr(model, "_hub_mixin_config", None)  # smp keeps its constructor arguments
    if config is None or not type(model).__module__.startswith("segmentation_models_pytorch"):
        return None
    return {"arch": type(model).__name__, **dict(config)}


def _build_smp(arch: str, **kwargs: Any) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    # The weights come from the checkpoint: never download pretrained ones again.
    return getattr(smp, arch)(**dict(kwargs, encoder_weights=None))


register_model_family("smp", _build_smp, _describe_smp)
