"""Nuclei instance segmentation data: Data Science Bowl 2018 folders, label-image folders, and a
synthetic H&E stand-in.

Nuclei come in crowds that touch and overlap, so the target is an instance label image, not a
binary mask (the setting of Mahbod et al. 2022): every data set yields ``(image, labels)`` with
``image`` float32 (3, size, size), normalised exactly as the polyp sets are (tasks.images.MEAN / STD),
and ``labels`` int64 (size, size) holding 0 for background and one positive id per nucleus.
Images are resized bilinear, labels with nearest neighbour: interpolating ids would invent
nuclei along every boundary.

The conventions are the image tasks' (polyprune_ext.tasks.images): deterministic train/val
splits (split_indices), accepted image extensions, decoding that names a bad file, optional
caching of the resized arrays, and flips/90-degree rotations applied jointly to image and target.
The synthetic set is the default source (``nuclei_dataset()``), so code and tests run without data.
"""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import (IMAGE_EXTENSIONS, SyntheticSplit, augment, check_pairs, check_same_size,
                      check_size, decode, fractal_noise, list_images, normalize, split_indices,
                      value_noise, verify_files)

LABEL_EXTENSIONS = (".png", ".tif", ".tiff")  # lossless formats that hold integer ids
_DSB_LAYOUT = ("expected the Data Science Bowl 2018 layout: one folder per sample, "
               "<id>/images/<id>.png and <id>/masks/*.png with one binary mask per nucleus")
_LABEL_LAYOUT = ("expected a folder holding images/ and labels/, with one instance-label image "
                 "(integer ids, 0 background; 16-bit PNG or TIFF) per image under the same file "
                 "name stem (e.g. images/case01.png and labels/case01.tif; image extensions: "
                 + ", ".join(IMAGE_EXTENSIONS) + "; label extensions: " + ", ".join(LABEL_EXTENSIONS)
                 + ")")


class _NucleiDataset(torch.utils.data.Dataset):
    """What every nuclei data set shares: uint8 image and id array -> the tensors an item returns."""

    size: int
    augment: bool

    def _tensors(self, image, labels):
        """uint8 (H, W, 3) image and (H, W) integer ids -> float32 (3, H, W) and int64 (H, W)."""
        x, y = normalize(image), torch.from_numpy(labels.astype(np.int64))
        return augment(x, y) if self.augment else (x, y)


class _NucleiFolder(_NucleiDataset):
    """Splitting, caching and resizing for the folder layouts; a subclass reads one sample.

    ``samples`` maps each sample's name to whatever its ``_read`` needs; names are sorted before
    splitting, so a split depends on the set of names only. Files are listed up front, so layout
    problems surface at once; pixels are decoded when an item is first read, or all at once by
    ``verify()``. With ``cache=True`` the resized arrays are kept (about 7 * size**2 bytes per
    item), per DataLoader worker. A mask or label image of another size than its image is
    refused, naming both, unless ``allow_resize_masks`` (then it is resized to the image,
    nearest neighbour).
    """

    def __init__(self, samples, *, size, split, val_count, val_fraction, seed, augment, cache,
                 allow_resize_masks):
        check_size(size)
        self.size, self.augment, self.split = size, augment, split
        self.allow_resize_masks = allow_resize_masks
        all_names = sorted(samples)
        chosen = split_indices(len(all_names), split, val_count=val_count,
                               val_fraction=val_fraction, seed=seed)
        self.names = [all_names[i] for i in chosen]
        self._files = [samples[name] for name in self.names]
        self._cache = {} if cache else None

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        index = range(len(self))[index]  # IndexError and negative indices, as for a list
        arrays = self._cache.get(index) if self._cache is not None else None
        if arrays is None:
            image, labels = self._read(self._files[index])
            image = image.resize((self.size, self.size), Image.BILINEAR)
            arrays = np.array(image, dtype=np.uint8), _resize_nearest(labels, (self.size, self.size))
            if self._cache is not None:
                self._cache[index] = arrays
        return self._tensors(*arrays)

    def verify(self):
        """Decode every file of this split and check every target's size (images.verify_files):
        a damaged file or a target of another size is found before training, not in its epoch."""
        verify_files([(image, self._targets(targets)) for image, targets in self._files],
                     allow_resize_masks=self.allow_resize_masks)

    def _read(self, files):
        """One sample at native resolution: (RGB PIL image, (H, W) integer id array)."""
        raise NotImplementedError

    def _targets(self, targets):
        """The target file paths of one sample's files entry."""
        raise NotImplementedError


class DSB2018Folder(_NucleiFolder):
    """The 2018 Data Science Bowl layout: ``root/<id>/images/<id>.png`` and ``root/<id>/masks/*.png``.

    Each mask file holds one nucleus (> 127 on its grayscale is inside). The label image is built
    at the image's native resolution: the k-th mask in file name order (plain string order, so
    x_10.png before x_2.png) gets id k + 1, and where masks overlap the later one wins (the
    released stage-1 test masks do not overlap; other copies and hand-made sets may). Ids are mask
    positions, not renumbered, so one that is covered completely, or too small to survive resizing,
    is absent. An empty masks/ folder is an image without nuclei. RGBA and grayscale images (the
    set mixes fluorescence, bright-field and H&E) are converted to RGB; alpha is dropped.
    """

    def __init__(self, root, *, size=256, split="all", val_count=None, val_fraction=0.12, seed=0,
                 augment=False, cache=True, allow_resize_masks=False):
        self.root = Path(root)
        super().__init__(_dsb_samples(self.root), size=size, split=split, val_count=val_count,
                         val_fraction=val_fraction, seed=seed, augment=augment, cache=cache,
                         allow_resize_masks=allow_resize_masks)

    def _read(self, files):
        image_path, mask_paths = files
        image = decode(image_path, "RGB")
        labels = np.zeros((image.height, image.width), dtype=np.int32)
        for k, mask_path in enumerate(mask_paths):
            mask = decode(mask_path, "L")
            if not self.allow_resize_masks:
                check_same_size(image_path, image.size, mask_path, mask.size)
            elif mask.size != image.size:
                mask = mask.resize(image.size, Image.NEAREST)
            labels[np.asarray(mask) > 127] = k + 1
        return image, labels

    def _targets(self, targets):
        return targets


def _dsb_samples(root):
    """{sample folder name: (image path, sorted mask paths)}; errors name the folder at fault."""
    if not root.is_dir():
        raise FileNotFoundError(f"nuclei data folder {root} does not exist; {_DSB_LAYOUT}")
    samples = {}
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        for part in ("images", "masks"):
            if not (folder / part).is_dir():
                raise FileNotFoundError(f"sample folder {folder} has no {part}/ folder; {_DSB_LAYOUT}")
        images = _image_files(folder / "images", IMAGE_EXTENSIONS)
        if len(images) != 1:
            names = [p.name for p in images]
            raise ValueError(f"sample folder {folder} holds {len(images)} images in images/ {names}, "
                             f"expected exactly one; {_DSB_LAYOUT}")
        samples[folder.name] = (images[0], _image_files(folder / "masks", IMAGE_EXTENSIONS))
    if not samples:
        raise ValueError(f"no sample folders in {root}; {_DSB_LAYOUT}")
    return samples


class LabelFolder(_NucleiFolder):
    """Images in ``root/images`` and instance-label images in ``root/labels``, matched by stem.

    A label image holds the ids themselves (0 background), usually as a 16-bit PNG or a TIFF, the
    layout of NuInsSeg and of most instance sets after conversion; its values are read as they are,
    never converted through a colour mode. Stems must pair up exactly, as for data.PolypFolder.
    """

    def __init__(self, root, *, size=256, split="all", val_count=None, val_fraction=0.12, seed=0,
                 augment=False, cache=True, allow_resize_masks=False):
        self.root = Path(root)
        images = list_images(self.root, "images", _LABEL_LAYOUT)
        labels = list_images(self.root, "labels", _LABEL_LAYOUT, LABEL_EXTENSIONS)
        check_pairs(self.root, images, labels, "labels", _LABEL_LAYOUT)
        super().__init__({stem: (images[stem], labels[stem]) for stem in images}, size=size,
                         split=split, val_count=val_count, val_fraction=val_fraction, seed=seed,
                         augment=augment, cache=cache, allow_resize_masks=allow_resize_masks)

    def _read(self, files):
        image_path, label_path = files
        image = decode(image_path, "RGB")
        labels = _decode_labels(label_path)
        if not self.allow_resize_masks:
            check_same_size(image_path, image.size, label_path, labels.shape[::-1])
        elif labels.shape != (image.height, image.width):
            labels = _resize_nearest(labels, (image.height, image.width))
        return image, labels

    def _targets(self, label_path):
        return [label_path]


def _image_files(folder, extensions):
    """The files in ``folder`` with one of ``extensions``, sorted by name; hidden files skipped."""
    return [path for path in sorted(folder.iterdir())
            if not path.name.startswith(".") and path.suffix.lower() in extensions and path.is_file()]


def _decode_labels(path):
    """The (H, W) integer ids stored in one label image, read without any mode conversion (which
    would turn palette indices into gray levels or clip 16-bit ids); a bad file names itself."""
    try:
        with Image.open(path) as im:
            labels = np.array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode label image file {path}: {e}") from e
    if labels.ndim != 2 or labels.dtype.kind not in "biu" or (labels.size and labels.min() < 0):
        raise ValueError(f"label image {path} must hold one channel of non-negative integer ids, "
                         f"got {labels.dtype} values of shape {labels.shape}")
    return labels


def _resize_nearest(labels, shape):
    """Nearest-neighbour resize of an id array to ``shape`` (height, width), sampling at pixel
    centres as PIL's NEAREST does, so the ids stay exact and aligned with the bilinear image."""
    height, width = labels.shape
    rows = ((np.arange(shape[0]) + 0.5) * (height / shape[0])).astype(np.int64)
    cols = ((np.arange(shape[1]) + 0.5) * (width / shape[1])).astype(np.int64)
    return labels[rows[:, None], cols[None, :]]


class SyntheticNuclei(SyntheticSplit, _NucleiDataset):
    """Procedurally drawn H&E-like tiles crowded with nuclei, and their instance labels
    (``synthetic_nuclei``); options as for tasks.images.SyntheticSplit."""

    def __init__(self, count=200, **options):
        super().__init__(count, **options)

    def _draw(self, index):
        return synthetic_nuclei(self.seed, index, self.size)


def synthetic_nuclei(seed, index, size=256):
    """One synthetic tile: (uint8 (size, size, 3) image, int32 (size, size) ids 0..K).

    Lengths are in pixels of a 256 tile, scaled by size / 256, so a tile looks the same at any size.
    Layers, back to front: pale pink eosin modulated by smooth noise, darker wavy fibres, a few
    near-white gaps, then 20-80 haematoxylin-purple ellipses (half of them placed against an earlier
    one, which grows touching and slightly overlapping clusters) with chromatin texture, a paler
    centre and a soft edge, then sensor noise. Where ellipses overlap the later one is on top, in
    the image and in the labels; instances left with fewer than 8 pixels (at 256) are dropped and
    the rest renumbered 1..K in drawing order.
    """
    rng = np.random.default_rng([seed, index])
    scale = size / 256
    eosin = (np.array([0.92, 0.66, 0.80]) + rng.uniform(-0.04, 0.04, 3)).astype(np.float32)
    tone = 0.05 * fractal_noise(rng, size, 4, 3) + 0.03 * fractal_noise(rng, size, 32, 2)
    img = eosin * (1 + tone)[..., None]
    # Fibres: bands along the zero lines of two noise fields, a deeper pink than the stroma.
    fibres = sum(np.exp(-(fractal_noise(rng, size, cells, 2) / 0.25) ** 2) for cells in (5, 9))
    img *= 1 - rng.uniform(0.06, 0.14) * fibres[..., None] * np.array([0.3, 0.9, 0.5], np.float32)
    gaps = np.clip(6 * (value_noise(rng, size, 3) - 1.1), 0, 1)[..., None]
    img += gaps * (np.array([0.97, 0.95, 0.97], np.float32) - img)

    haematoxylin = (np.array([0.36, 0.22, 0.52]) + rng.uniform(-0.05, 0.05, 3)).astype(np.float32)
    chromatin = fractal_noise(rng, size, max(1, round(40 * scale)), 2)
    labels = np.zeros((size, size), dtype=np.int32)
    pixel_centres = np.arange(size, dtype=np.float32) + 0.5
    placed = []  # (cx, cy, mean radius) of the nuclei drawn so far
    count = int(rng.integers(20, 81))
    for instance in range(1, count + 1):
        a = rng.uniform(3.5, 10) * scale  # semi-major axis
        b = a * rng.uniform(0.55, 1.0)
        if placed and rng.random() < 0.5:  # against an earlier nucleus: touching or overlapping a bit
            px, py, pr = placed[rng.integers(len(placed))]
            reach, direction = (pr + (a + b) / 2) * rng.uniform(0.8, 1.0), rng.uniform(0, 2 * math.pi)
            cx, cy = px + reach * math.cos(direction), py + reach * math.sin(direction)
        else:
            cx, cy = rng.uniform(0, size, 2)
        placed.append((cx, cy, (a + b) / 2))
        angle = rng.uniform(0, math.pi)
        darkness, pale_centre = rng.uniform(0.75, 1.15), rng.uniform(0, 0.25)
        x0, x1 = max(int(cx - a) - 2, 0), min(int(cx + a) + 3, size)
        y0, y1 = max(int(cy - a) - 2, 0), min(int(cy + a) + 3, size)
        if x0 >= x1 or y0 >= y1:
            continue
        # Vectorised over the bounding box: u < 1 inside the ellipse, u = 1 on its outline.
        dx, dy = pixel_centres[None, x0:x1] - cx, pixel_centres[y0:y1, None] - cy
        cos, sin = math.cos(angle), math.sin(angle)
        u = np.sqrt(((dx * cos + dy * sin) / a) ** 2 + ((dy * cos - dx * sin) / b) ** 2)
        labels[y0:y1, x0:x1][u < 1] = instance
        alpha = np.clip((1 - u) * (b / 1.5) + 0.5, 0, 1)[..., None]  # about 1.5 pixels of soft edge
        shade = darkness * (1 + 0.2 * chromatin[y0:y1, x0:x1]) * (1 + pale_centre * np.maximum(1 - u**2, 0))
        box = img[y0:y1, x0:x1]
        box += alpha * (haematoxylin * shade[..., None] - box)

    img += rng.standard_normal(img.shape, dtype=np.float32) * 0.012
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    pixels = np.bincount(labels.ravel(), minlength=count + 1)
    kept = pixels >= max(1, round(8 * scale**2))
    kept[0] = False
    renumber = np.zeros(count + 1, dtype=np.int32)
    renumber[kept] = np.arange(1, kept.sum() + 1, dtype=np.int32)
    return image, renumber[labels]


def nuclei_dataset(source=None, **kwargs):
    """The nuclei data set for ``source``: None or "synthetic" -> SyntheticNuclei(**kwargs); a folder
    -> DSB2018Folder when it holds sample folders with images/ and masks/, else LabelFolder when it
    holds images/ and labels/; anything else is an error that describes both layouts."""
    if source is None or source == "synthetic":
        return SyntheticNuclei(**kwargs)
    root = Path(source)
    if root.is_dir():
        if any((sub / "images").is_dir() and (sub / "masks").is_dir() for sub in root.iterdir()):
            return DSB2018Folder(root, **kwargs)
        if (root / "images").is_dir() and (root / "labels").is_dir():
            return LabelFolder(root, **kwargs)
    raise FileNotFoundError(f"{root} is not a nuclei data folder (or does not exist): {_DSB_LAYOUT}; "
                            f"or {_LABEL_LAYOUT}")
