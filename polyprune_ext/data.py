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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as smp encoders expect

SPLITS = ("all", "train", "val")
_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)
_LAYOUT = ("expected a folder holding images/ and masks/, with one mask per image under the same "
           "file name stem (e.g. images/case01.jpg and masks/case01.png; extensions: "
           + ", ".join(IMAGE_EXTENSIONS) + ")")


def split_indices(n, split="all", *, val_count=None, val_fraction=0.12, seed=0):
    """The indices 0..n-1 that belong to ``split``, sorted.

    A seeded permutation (torch.Generator, so the split is the same on every machine and numpy
    version) puts the first ``val_count`` (default ``round(val_fraction * n)``) items in "val" and
    the rest in "train"; "all" is everything. The result is sorted so the item order of a split
    does not depend on the seed, only its membership does.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n <= 0:
        raise ValueError("the data set is empty: there is nothing to split")
    if val_count is None:
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1], got {val_fraction}")
        val_count = round(val_fraction * n)
    if not 0 <= val_count <= n:
        raise ValueError(f"val_count={val_count} does not fit a set of {n} items "
                         f"(it must lie in 0..{n})")
    if split == "all":
        return list(range(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = sorted(perm[:val_count] if split == "val" else perm[val_count:])
    if not chosen:
        raise ValueError(f"split {split!r} is empty: {n} items with val_count={val_count}; "
                         "change val_count or val_fraction")
    return chosen


class _PolypDataset(torch.utils.data.Dataset):
    """What both datasets share: turning uint8 arrays into normalised tensors, and augmentation."""

    size: int
    augment: bool

    def _tensors(self, image, mask):
        """uint8 (H, W, 3) image and (H, W) 0/1 mask -> the float32 tensors every item returns."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        x = (x - _MEAN) / _STD
        y = torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32).unsqueeze(0)
        if self.augment:
            x, y = self._augment(x, y)
        return x, y

    @staticmethod
    def _augment(x, y):
        """Random flips and 90-degree rotations, the same on image and mask.

        Colonoscopy has no canonical orientation, so these are label-preserving and cost nothing.
        The draws come from torch's global RNG, which DataLoader seeds differently per worker;
        three numbers are drawn every time so the RNG stream does not depend on the outcomes.
        """
        flip_h, flip_v = (torch.rand(2) < 0.5).tolist()
        turns = int(torch.randint(0, 4, ()))
        if flip_h:
            x, y = x.flip(-1), y.flip(-1)
        if flip_v:
            x, y = x.flip(-2), y.flip(-2)
        if turns:
            x, y = x.rot90(turns, (-2, -1)), y.rot90(turns, (-2, -1))
        return x.contiguous(), y.contiguous()


def _check_size(size):
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")


class PolypFolder(_PolypDataset):
    """Image/mask pairs from ``root/images`` and ``root/masks``, matched by file name stem.

    This is the layout of Kvasir-SEG, and the one CVC-ClinicDB, ETIS or ColonDB take after renaming
    their folders. Every image is resized to ``size`` x ``size`` (bilinear) and every mask with
    nearest neighbour, then thresholded at > 127 on its 0-255 grayscale, since JPEG-saved masks
    (Kvasir-SEG's) hold values near, not at, 0 and 255.

    The folders are listed and matched in the constructor, so layout problems surface at once;
    pixels are decoded when an item is first read. With ``cache=True`` the resized uint8 arrays are
    kept (about 4 * size**2 bytes per item): decoding large JPEGs dominates epoch time otherwise.
    Each DataLoader worker process fills its own cache (use persistent_workers to keep them).
    """

    def __init__(self, root, *, size=352, split="all", val_count=None, val_fraction=0.12, seed=0,
                 augment=False, cache=True):
        _check_size(size)
        self.root = Path(root)
        self.size, self.augment, self.split = size, augment, split
        images = _list_images(self.root, "images")
        masks = _list_images(self.root, "masks")
        _check_pairs(self.root, images, masks)
        all_stems = sorted(images)
        chosen = split_indices(len(all_stems), split, val_count=val_count,
                               val_fraction=val_fraction, seed=seed)
        self.stems = [all_stems[i] for i in chosen]
        self._files = [(images[s], masks[s]) for s in self.stems]
        self._cache = {} if cache else None

    def __len__(self):
        return len(self.stems)

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
        image = _decode(image_path, "RGB").resize((self.size, self.size), Image.BILINEAR)
        mask = _decode(mask_path, "L").resize((self.size, self.size), Image.NEAREST)
        return np.array(image, dtype=np.uint8), (np.asarray(mask) > 127).astype(np.uint8)


def _list_images(root, name, layout=_LAYOUT, extensions=IMAGE_EXTENSIONS):
    """{stem: path} of the files with ``extensions`` in root/name; errors quote ``layout``, the
    folder layout that was expected."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist; {layout}")
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing; {layout}")
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in extensions:
            continue
        if not path.is_file():
            continue
        if path.stem in files:
            raise ValueError(f"two files in {folder} share the stem {path.stem!r}: "
                             f"{files[path.stem].name} and {path.name}; keep one")
        files[path.stem] = path
    return files


def _check_pairs(root, images, targets, name="masks", layout=_LAYOUT):
    """Every image needs its target file in root/``name`` and vice versa: a silent intersection
    would hide a broken copy."""
    if not images and not targets:
        raise ValueError(f"no images in {root / 'images'} or {root / name}; {layout}")
    lonely_images = sorted(set(images) - set(targets))
    lonely_targets = sorted(set(targets) - set(images))
    if lonely_images or lonely_targets:
        raise ValueError(
            f"images and {name} in {root} do not pair up: {len(images)} images, {len(targets)} "
            f"{name}; {len(lonely_images)} images without a {name.rstrip('s')} (e.g. {lonely_images[:5]}), "
            f"{len(lonely_targets)} {name} without an image (e.g. {lonely_targets[:5]}); {layout}")


def _decode(path, mode):
    """Open and fully decode one file in ``mode``; a corrupt file names itself."""
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image file {path}: {e}") from e


class _SyntheticSplit:
    """What the synthetic sets share: item i depends only on (seed, i), drawn by ``_draw`` from
    its own numpy Generator: the same sample every time, in any process or worker, in any order,
    with nothing stored. ``seed`` also seeds the split of the indices 0..count-1 (as for the
    folders); ``.indices`` lists this split's."""

    def __init__(self, count, *, size=256, split="all", val_count=None, val_fraction=0.12,
                 seed=0, augment=False):
        _check_size(size)
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}: the data set would be empty")
        self.count, self.size, self.augment, self.split, self.seed = count, size, augment, split, seed
        self.indices = split_indices(count, split, val_count=val_count, val_fraction=val_fraction,
                                     seed=seed)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self._tensors(*self._draw(self.indices[index]))


class SyntheticPolyps(_SyntheticSplit, _PolypDataset):
    """Procedurally drawn colonoscopy-like frames with 1-2 polyps each, and their masks
    (``synthetic_polyp``); options as for _SyntheticSplit."""

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
    tone, grain = _fractal_noise(rng, size, 3, 3), _fractal_noise(rng, size, 14, 2)
    img = base * (1 + 0.12 * tone[..., None] + 0.04 * grain[..., None])
    img[..., 1] += 0.03 * tone  # slight hue drift across the wall

    # Vessels: thin bands along the zero lines of a noise field, kept only where a second, coarser
    # field is positive, which leaves a few disconnected curves rather than a full network.
    lines = np.exp(-(_fractal_noise(rng, size, 5, 3) / 0.07) ** 2)
    patches = np.clip(1.5 * _value_noise(rng, size, 3), 0, 1)
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
    texture = 1 + 0.07 * _fractal_noise(rng, size, 22, 2)
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


def _value_noise(rng, size, cells):
    """Smooth random field, (size, size), about unit variance: a (cells+1)^2 grid of Gaussian values
    interpolated with a smoothstep (no scipy or OpenCV needed). The interpolation is separable:
    along x on the small grid first, then along y, which touches each output pixel only twice."""
    grid = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(cells / size)
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i.astype(np.float32)
    f = f * f * (3 - 2 * f)
    rows = grid[:, i] * (1 - f) + grid[:, i + 1] * f  # (cells + 1, size)
    return rows[i] * (1 - f)[:, None] + rows[i + 1] * f[:, None]


def _fractal_noise(rng, size, cells, octaves):
    """Sum of value-noise octaves (each twice as fine, half as strong), rescaled to unit std."""
    total = sum(0.5**o * _value_noise(rng, size, cells * 2**o) for o in range(octaves))
    return total / (total.std() + 1e-8)


def polyp_dataset(source=None, **kwargs):
    """The data set behind every command: None or "synthetic" -> SyntheticPolyps(**kwargs),
    anything else is a folder path -> PolypFolder(source, **kwargs)."""
    if source is None or source == "synthetic":
        return SyntheticPolyps(**kwargs)
    return PolypFolder(source, **kwargs)
