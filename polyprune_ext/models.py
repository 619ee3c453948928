"""Model families a pruning plan can rebuild: the base model of a checkpoint is recorded as a
family name and constructor arguments (plain JSON, nothing pickled) and built again on load.

smp (segmentation_models_pytorch) and MONAI (monai.networks.nets, built by monai_model, which
keeps the arguments) are built in; ``named_model`` builds either from the names the polyprune
command takes. Applications register their own models (polyprune_ext.tasks.nuclei registers
NucleiNet); users do the same for theirs:

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


# -- MONAI -------------------------------------------------------------------------------------


MONAI_CONFIG = "polyprune_monai"  # the attribute monai_model keeps its arguments in


def monai_model(name: str = "UNet", **kwargs: Any) -> torch.nn.Module:
    """The MONAI network ``monai.networks.nets.<name>(**kwargs)``. It keeps ``name`` and the
    arguments (which must be JSON data: lists for tuples) on the instance, so that a pruning plan
    records them and a checkpoint rebuilds it."""
    try:
        import monai.networks.nets as nets
    except ImportError:
        raise ImportError("MONAI models need MONAI: pip install 'polyprune_ext[monai]'") from None
    network = getattr(nets, name, None)
    if not (isinstance(network, type) and issubclass(network, torch.nn.Module)):
        names = sorted(n for n in dir(nets) if isinstance(getattr(nets, n), type) and
                       issubclass(getattr(nets, n), torch.nn.Module))
        raise ValueError(f"unknown MONAI network {name!r}; choose one of {names}")
    try:
        json.dumps(kwargs)
    except TypeError as error:
        raise ValueError(f"monai_model's arguments must be JSON data (lists for tuples): {error}") from None
    try:
        model = network(**kwargs)
    except TypeError as error:  # a missing or unknown argument
        raise ValueError(f"monai.networks.nets.{name}({kwargs}): {error}") from None
    setattr(model, MONAI_CONFIG, {"name": name, **kwargs})
    return model


def _describe_monai(model: torch.nn.Module) -> Optional[dict]:
    return getattr(model, MONAI_CONFIG, None)


register_model_family("monai", monai_model, _describe_monai)


def named_model(arch: str = "Unet", encoder: str = "resnet34", *, encoder_weights: Optional[str] = None,
                classes: int = 1, **kwargs: Any) -> torch.nn.Module:
    """The model the polyprune command's ``--arch`` names: an smp architecture with ``encoder``
    (smp_model), or ``monai.<Name>``, a MONAI network (monai_model) that is 2-D with 3 input
    channels and ``classes`` outputs unless ``kwargs`` say otherwise (it has no encoder). Other
    ``kwargs`` go to the constructor."""
    if not arch.startswith("monai."):
        return smp_model(arch, encoder, classes=classes, encoder_weights=encoder_weights, **kwargs)
    if encoder_weights is not None:
        raise ValueError(f"{arch} has no pretrained encoder: leave encoder_weights out")
    return monai_model(arch.removeprefix("monai."),
                       **{"spatial_dims": 2, "in_channels": 3, "out_channels": classes, **kwargs})
