"""Polyp segmentation data: Kvasir-SEG / CVC-ClinicDB style folders, and a synthetic stand-in.

Both datasets yield the same thing, so training, scoring and evaluation code never cares where the
pixels came from: ``(image, mask)`` with ``image`` float32 (3, size, size) normalised with the
ImageNet mean/std that smp encoders expect, and ``mask`` float32 (1, size, size) holding 0. or 1.

The synthetic set is the default source (``polyp_dataset()``): it lets the whole pipeline, its tests
and its demo run on a machine with no data. It is not a substitute for real images when measuring
accuracy, only a task with the same shape and a similar look (pink mucosa, vessels, vignetting,
blob-like polyps with highlights), hard enough that a model has to learn something.

Train/val splits are deterministic functions of (set, seed, val_count / val_fraction), so a train
set and a val set built separately with the same arguments never overlap, in any process.
"""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import (IMAGE_EXTENSIONS, SyntheticSplit, augment, check_pairs, check_same_size,
                      check_size, decode, fractal_noise, list_images, normalize, split_indices,
                      value_noise, verify_files)

_LAYOUT = ("expected a folder holding images/ and masks/, with one mask per image under the same "
           "file name stem (e.g. images/case01.jpg and masks/case01.png; extensions: "
           + ", ".join(IMAGE_EXTENSIONS) + ")")


class _PolypDataset(torch.utils.data.Dataset):
    """What both datasets share: uint8 arrays -> the normalised tensors every item returns."""

    size: int
    augment: bool

    def _tensors(self, image, mask):
        """uint8 (H, W, 3) image and (H, W) 0/1 mask -> float32 (3, H, W) and (1, H, W)."""
        x = normalize(image)
        y = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32).unsqueeze(0)
        return augment(x, y) if self.augment else (x, y)


class PolypFolder(_PolypDataset):
    """Image/mask pairs from ``root/images`` and ``root/masks``, matched by file name stem.

    This is the layout of Kvasir-SEG, and the one CVC-ClinicDB, ETIS or ColonDB take after renaming
    their folders. Every image is resized to ``size`` x ``size`` (bilinear) and every mask with
    nearest neighbour, then thresholded at > 127 on its 0-255 grayscale, since JPEG-saved masks
    (Kvasir-SEG's) hold values near, not at, 0 and 255. A mask of another size than its image is
    refused, naming both, unless ``allow_resize_masks`` (then it is stretched like its image).

    The folders are listed and matched in the constructor, so layout problems surface at once;
    pixels are decoded when an item is first read, or all at once by ``verify()``. With
    ``cache=True`` the resized uint8 arrays are kept (about 4 * size**2 bytes per item): decoding
    large JPEGs dominates epoch time otherwise. Each DataLoader worker process fills its own cache
    (use persistent_workers to keep them).
    """

    def __init__(self, root, *, size=352, split="all", val_count=None, val_fraction=0.12, seed=0,
                 augment=False, cache=True, allow_resize_masks=False):
        check_size(size)
        self.root = Path(root)
        self.size, self.augment, self.split = size, augment, split
        self.allow_resize_masks = allow_resize_masks
        images = list_images(self.root, "images", _LAYOUT)
        masks = list_images(self.root, "masks", _LAYOUT)
        check_pairs(self.root, images, masks, "masks", _LAYOUT)
        all_stems = sorted(images)
        chosen = split_indices(len(all_stems), split, val_count=val_count,
                               val_fraction=val_fraction, seed=seed)
        self.stems = [all_stems[i] for i in chosen]
        self._files = [(images[s], masks[s]) for s in self.stems]
        self._cache = {} if cache else None

    def __len__(self):
        return len(self.stems)

    def verify(self):
        """Decode every file of this split and check every mask's size (tasks.images.verify_files):
        a damaged file or a mask of another size is found before training, not in its epoch."""
        verify_files([(image, [mask]) for image, mask in self._files],
                     allow_resize_masks=self.allow_resize_masks)

    def __getitem__(self, index):
        index = range(len(self))[index]  # IndexError and negative indices, as for a list
        arrays = self._cache.get(index) if self._cache is not None else None
        if arrays is None:
            arrays = self._load(index)
            if self._cache is not None:
                self._cache[index] = arrays
        return self._tensors(*arrays)

    def _load(self, index):
        image_path, mask_path = self._files[index]
        image, mask = decode(image_path, "RGB"), decode(mask_path, "L")
        if not self.allow_resize_masks:
            check_same_size(image_path, image.size, mask_path, mask.size)
        image = image.resize((self.size, self.size), Image.BILINEAR)
        mask = mask.resize((self.size, self.size), Image.NEAREST)
        return np.array(image, dtype=np.uint8), (np.asarray(mask) > 127).astype(np.uint8)


class SyntheticPolyps(SyntheticSplit, _PolypDataset):
    """Procedurally drawn colonoscopy-like frames with 1-2 polyps each, and their masks
    (``synthetic_polyp``); options as for SyntheticSplit."""

    def __init__(self, count=240, **options):
        super().__init__(count, **options)

    def _draw(self, index):
        return synthetic_polyp(self.seed, index, self.size)


def synthetic_polyp(seed, index, size=256):
    """One synthetic frame: (uint8 (size, size, 3) image, uint8 (size, size) 0/1 mask).

    Everything is drawn in coordinates scaled to [0, 1], so a frame looks the same at any size.
    Layers, back to front: mucosa colour modulated by smooth noise, dark vessel-like curves, a dark
    lumen, the polyps (irregular blobs, dome shading, their own tint and texture, a shadowed rim),
    specular highlights on polyps and on the mucosa (so brightness alone does not give polyps
    away), vignetting and sensor noise.
    """
    rng = np.random.default_rng([seed, index])
    # float32 throughout: half the memory traffic of float64, and plenty for 8-bit output.
    x = ((np.arange(size, dtype=np.float32) + 0.5) / size)[None, :]
    y = ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None]

    base = (np.array([0.80, 0.45, 0.38]) + rng.uniform(-0.06, 0.06, 3)).astype(np.float32)
    tone, grain = fractal_noise(rng, size, 3, 3), fractal_noise(rng, size, 14, 2)
    img = base * (1 + 0.12 * tone[..., None] + 0.04 * grain[..., None])
    img[..., 1] += 0.03 * tone  # slight hue drift across the wall

    # Vessels: thin bands along the zero lines of a noise field, kept only where a second, coarser
    # field is positive, which leaves a few disconnected curves rather than a full network.
    lines = np.exp(-(fractal_noise(rng, size, 5, 3) / 0.07) ** 2)
    patches = np.clip(1.5 * value_noise(rng, size, 3), 0, 1)
    vessel_color = np.array([0.45, 0.8, 0.7], dtype=np.float32)
    img *= 1 - rng.uniform(0.2, 0.45) * (lines * patches)[..., None] * vessel_color

    if rng.random() < 0.6:  # the dark lumen further down the colon
        lx, ly, ls = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.06, 0.15)
        img *= 1 - 0.75 * np.exp(-((x - lx) ** 2 + (y - ly) ** 2) / (2 * ls**2))[..., None]

    mask = np.zeros((size, size), dtype=bool)
    glints = []  # (x, y, radius) of specular highlights
    for _ in range(rng.integers(1, 3)):
        img, inside = _draw_polyp(rng, img, x, y, base, size, glints)
        mask |= inside
    for _ in range(rng.integers(2, 7)):
        glints.append((rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.004, 0.012)))
    gx, gy, gr = (np.array(v, dtype=np.float32)[:, None, None] for v in zip(*glints))
    shine = np.clip(1.6 * np.exp(-((x - gx) ** 2 + (y - gy) ** 2) / (2 * gr**2)), 0, 1).max(0)
    white = np.array([1.0, 0.97, 0.95], dtype=np.float32)
    img = img * (1 - shine[..., None]) + shine[..., None] * white

    r2 = (x - 0.5) ** 2 + (y - 0.5) ** 2
    img *= (1 - rng.uniform(0.35, 0.6) * np.clip(r2 / 0.5, 0, 1) ** 1.2)[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * 0.01
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, mask.astype(np.uint8)


def _draw_polyp(rng, img, x, y, base, size, glints):
    """Composite one polyp onto ``img``; returns the new image and the polyp's boolean mask.

    The outline is r(theta) = r0 * (1 + sum_k a_k cos(k theta + phi_k)), k = 2..5: with zero-mean
    terms the area is at least pi r0^2, and keeping the centre 1.3 r0 from the border keeps almost
    all of it in frame, so a polyp covers roughly 2.5% to 13% of the image.
    """
    r0 = rng.uniform(0.09, 0.2)
    cx, cy = (rng.uniform(1.3 * r0, 1 - 1.3 * r0) for _ in range(2))
    dx, dy = x - cx, y - cy
    rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    radius = np.full_like(rho, r0)
    for k in range(2, 6):
        amp, phase = rng.uniform(0, 0.12) / math.sqrt(k - 1), rng.uniform(0, 2 * math.pi)
        radius += r0 * amp * np.cos(k * theta + phase)
    u = rho / radius  # < 1 inside the polyp
    inside = u < 1

    light = rng.uniform(0, 2 * math.pi)
    dome = np.sqrt(np.clip(1 - u**2, 0, 1))
    shade = 0.78 + 0.28 * dome + 0.14 * np.minimum(u, 1) * np.cos(theta - light)
    tint = (1 + rng.uniform(-0.1, 0.1, 3) + np.array([0.05, -0.04, 0.0])).astype(np.float32)
    texture = 1 + 0.07 * fractal_noise(rng, size, 22, 2)
    polyp = base * tint * (shade * texture)[..., None]

    alpha = np.clip((1 - u) * radius * size + 0.5, 0, 1)[..., None]  # one-pixel antialiased edge
    rim = np.exp(-(np.maximum(u - 1, 0) / 0.12) ** 2) * ~inside
    img = img * (1 - 0.25 * rim[..., None])
    img = img * (1 - alpha) + polyp * alpha

    for _ in range(rng.integers(1, 5)):  # highlights sit on the side facing the light
        d = rng.uniform(0.15, 0.6) * r0
        a = light + rng.normal(0, 0.5)
        glints.append((cx + d * math.cos(a), cy + d * math.sin(a), rng.uniform(0.005, 0.018)))
    return img, inside


def polyp_dataset(source=None, **kwargs):
    """The data set behind every command: None or "synthetic" -> SyntheticPolyps(**kwargs),
    anything else is a folder path -> PolypFolder(source, **kwargs)."""
    if source is None or source == "synthetic":
        return SyntheticPolyps(**kwargs)
    return PolypFolder(source, **kwargs)
