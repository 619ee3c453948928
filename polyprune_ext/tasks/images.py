"""What the image tasks share: the folder conventions, deterministic splits, decoding that names a
bad file, a scan of a whole folder before training, ImageNet normalisation, flips and rotations
applied jointly to an image and its target, synthetic sets whose items depend only on their
index, and smooth noise to draw them with.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as smp encoders expect

SPLITS = ("all", "train", "val")
_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) normalised with the ImageNet mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - _MEAN) / _STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """A normalised (3, H, W) image back to colours in [0, 1] (up to rounding)."""
    return x * _STD.to(x.device) + _MEAN.to(x.device)


def augment(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90-degree rotations, the same on image and target.

    Colonoscopy and microscopy have no canonical orientation, so these are label-preserving and
    cost nothing. The draws come from torch's global RNG, which DataLoader seeds differently per
    worker; three numbers are drawn every time so the RNG stream does not depend on the outcomes.
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


def check_size(size):
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")


def list_images(root, name, layout, extensions=IMAGE_EXTENSIONS):
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


def check_pairs(root, images, targets, name, layout):
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


def decode(path, mode):
    """Open and fully decode one file in ``mode``; a corrupt file names itself."""
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image file {path}: {e}") from e


RESIZE_HINT = "allow_resize_masks=True (--allow-resize-masks) stretches each mask to its image"


def check_same_size(image_path, image_size, target_path, target_size):
    """A target of another size than its image cannot be aligned with it; (width, height) pairs."""
    if tuple(image_size) != tuple(target_size):
        raise ValueError(f"{target_path} is {target_size[0]}x{target_size[1]} but its image "
                         f"{image_path} is {image_size[0]}x{image_size[1]}; they must match, or "
                         f"{RESIZE_HINT}")


def verify_files(samples, *, allow_resize_masks=False):
    """Decode every file of ``samples`` ((image path, [target paths]) pairs) in full and, unless
    ``allow_resize_masks``, check that each target has its image's size: what a folder data set
    otherwise finds only when it first reads an item, partway through an epoch. One ValueError
    names the files at fault (the first five) and counts them. Files are decoded on a few
    threads (Pillow decodes without the GIL): 2000 Kvasir-SEG files take about 3 s on one core.
    """
    def problems(sample):
        """(files that do not decode, targets of another size than their image)"""
        image, targets = sample
        sizes = {path: _decoded_size(path) for path in (image, *targets)}
        undecodable = [size for size in sizes.values() if isinstance(size, str)]
        if allow_resize_masks or isinstance(sizes[image], str):
            return undecodable, []
        width, height = sizes[image]
        return undecodable, [f"{t} is {sizes[t][0]}x{sizes[t][1]} but its image is {width}x{height}"
                             for t in targets if isinstance(sizes[t], tuple) and sizes[t] != sizes[image]]

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(problems, samples))
    mismatched = [p for _, found in results for p in found]
    found = [p for undecodable, _ in results for p in undecodable] + mismatched
    if found:
        raise ValueError(f"{len(found)} problem{'s' if len(found) > 1 else ''} in the data set: "
                         + "; ".join(found[:5]) + ("; ..." if len(found) > 5 else "")
                         + (f"; {RESIZE_HINT}" if mismatched else ""))


def _decoded_size(path):
    """(width, height) of the image file at ``path`` after a full decode, or what is wrong."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot decode {path}: {e}"


class SyntheticSplit:
    """What the synthetic sets share: item i depends only on (seed, i), drawn by ``_draw`` from
    its own numpy Generator: the same sample every time, in any process or worker, in any order,
    with nothing stored. ``seed`` also seeds the split of the indices 0..count-1 (as for the
    folders); ``.indices`` lists this split's."""

    def __init__(self, count, *, size=256, split="all", val_count=None, val_fraction=0.12,
                 seed=0, augment=False):
        check_size(size)
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}: the data set would be empty")
        self.count, self.size, self.augment, self.split, self.seed = count, size, augment, split, seed
        self.indices = split_indices(count, split, val_count=val_count, val_fraction=val_fraction,
                                     seed=seed)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self._tensors(*self._draw(self.indices[index]))


def value_noise(rng, size, cells):
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


def fractal_noise(rng, size, cells, octaves):
    """Sum of value-noise octaves (each twice as fine, half as strong), rescaled to unit std."""
    total = sum(0.5**o * value_noise(rng, size, cells * 2**o) for o in range(octaves))
    return total / (total.std() + 1e-8)
