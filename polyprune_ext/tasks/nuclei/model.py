"""Nuclei instance segmentation (after Mahbod et al. 2022): a two-branch network, its targets,
loss and metrics.

One branch segments nuclei against background (a logit map, Dice+BCE); the other regresses each
nucleus's normalised distance map (MSE), whose peaks separate touching nuclei. Watershed on the
predicted distance map, inside the predicted mask, turns the pair into instances
(polyprune_ext.instances). The branches are two smp networks, or one shared encoder with two
decoders. The model returns one tensor, channel 0 the semantic logits and channel 1 the distance
map, so training, scoring, structural pruning and checkpoints treat it like any segmentation model.
"""

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .instances import InstanceMetrics, instance_targets, watershed_instances
from ..metrics import BinarySegmentationMetrics, dice_bce_loss
from .data import nuclei_dataset
from ...models import register_model_family, smp_model


class NucleiNet(torch.nn.Module):
    """Two smp networks of ``arch`` and ``encoder`` (encoder_weights=None), ``semantic`` and
    ``regression``; with ``shared_encoder`` the regression branch reads the semantic branch's
    encoder features and has no encoder of its own."""

    def __init__(self, arch: str = "Unet", encoder: str = "resnet34", shared_encoder: bool = False,
                 *, encoder_weights: Optional[str] = None):
        super().__init__()
        self.spec = dict(arch=arch, encoder=encoder, shared_encoder=shared_encoder)  # to rebuild it
        self.semantic = smp_model(arch, encoder, encoder_weights=encoder_weights)
        self.regression = smp_model(arch, encoder, encoder_weights=encoder_weights)
        self.shared_encoder = shared_encoder
        if shared_encoder:
            del self.regression.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_encoder:
            features = self.semantic.encoder(x)
            semantic = self.semantic.segmentation_head(self.semantic.decoder(features))
            distance = self.regression.segmentation_head(self.regression.decoder(features))
        else:
            semantic, distance = self.semantic(x), self.regression(x)
        return torch.cat([semantic, distance], 1)

    def networks(self) -> dict:
        """The separately pruned networks, by name: each branch, or the whole model when the
        branches share an encoder (a network-wide threshold then spans both decoders)."""
        if self.shared_encoder:
            return {"model": self}
        return {"semantic": self.semantic, "regression": self.regression}


class NucleiTargets(torch.utils.data.Dataset):
    """A nuclei data set (items ``(image, labels)``, polyprune_ext.nuclei_data) as training items
    ``(image, target)``: target (3, H, W) float32 holding the binary mask, the per-nucleus
    normalised distance map and the instance ids (exact as float32 up to 2**24), which the
    metrics need for AJI and PQ. Targets are computed after augmentation, from the labels."""

    def __init__(self, labelled):
        self.labelled = labelled

    def __len__(self):
        return len(self.labelled)

    def __getitem__(self, index):
        image, labels = self.labelled[index]
        mask, distance = instance_targets(labels.numpy())
        target = torch.stack([torch.from_numpy(mask), torch.from_numpy(distance), labels.float()])
        return image, target


def nuclei_datasets(source: Optional[str] = None, *, count: int = 200, verify: bool = False,
                    allow_resize_masks: bool = False, **kwargs: Any) -> tuple[NucleiTargets, NucleiTargets]:
    """(train, val) training sets from ``source`` (see data.nuclei_dataset; ``count`` synthetic
    items when it is None); the train split is augmented. For a folder, ``verify`` decodes every
    file and checks every target's size first, and ``allow_resize_masks`` resizes targets of
    another size than their image rather than refuse them."""
    if source is None or source == "synthetic":
        kwargs["count"] = count
    else:
        kwargs["allow_resize_masks"] = allow_resize_masks
        if verify:
            nuclei_dataset(source, **kwargs).verify()
    return (NucleiTargets(nuclei_dataset(source, split="train", augment=True, **kwargs)),
            NucleiTargets(nuclei_dataset(source, split="val", **kwargs)))


def nuclei_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice+BCE on the semantic logits plus MSE on the distance map, equally weighted."""
    return dice_bce_loss(output[:, :1], target[:, :1]) + F.mse_loss(output[:, 1:2], target[:, 1:2])


class NucleiMetrics:
    """Semantic Dice/IoU/precision/recall (dataset-level and per image, as for polyps), the
    distance map's MSE over all pixels, and instance AJI and PQ (mean over images) of the
    watershed instances; ``watershed`` options go to instances.watershed_instances."""

    def __init__(self, *, instances: bool = True, watershed: Optional[dict] = None):
        self.instances, self.watershed = instances, dict(watershed or {})
        self.reset()

    def reset(self) -> None:
        self.semantic, self.instance = BinarySegmentationMetrics(), InstanceMetrics()
        self.squared_error, self.pixels = 0.0, 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.dim() != 4 or output.shape[1] != 2 or target.shape[1] != 3:
            raise ValueError(f"expected output (N, 2, H, W) and target (N, 3, H, W), got "
                             f"{tuple(output.shape)} and {tuple(target.shape)}")
        self.semantic.update(output[:, :1], target[:, :1])
        self.squared_error += float((output[:, 1] - target[:, 1]).double().square().sum())
        self.pixels += target[:, 1].numel()
        if self.instances:
            probability = torch.sigmoid(output[:, 0].float()).cpu().numpy()
            distance = output[:, 1].float().cpu().numpy()
            labels = target[:, 2].long().cpu().numpy()
            for p, d, true in zip(probability, distance, labels):
                self.instance.update(true, watershed_instances(p, d, **self.watershed))

    def compute(self) -> dict:
        result = {**self.semantic.compute(), "mse": self.squared_error / max(self.pixels, 1)}
        if self.instances:
            result.update(self.instance.compute())
        return result


register_model_family("nuclei", NucleiNet,
                      lambda model: model.spec if isinstance(model, NucleiNet) else None)
