"""polyprune_ext.tasks.polyp.data: folder data sets (built here in tmp_path with Pillow), the synthetic set,
splits, augmentation and every error a wrong folder should give."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyprune_ext.tasks.images import MEAN, STD
from polyprune_ext.tasks.images import denormalize as unnormalize
from polyprune_ext.tasks.polyp import (PolypFolder, SyntheticPolyps, polyp_dataset, polyp_datasets,
                                       synthetic_polyp)
from polyprune_ext.testing import dihedral

KVASIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kvasir-seg"


def smooth_rgb(rng, height, width):
    """An image with broad gradients and blocks (JPEG keeps it close to the original)."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                    np.full_like(xx, int(rng.integers(0, 256)))], -1)
    return img.astype(np.uint8)


def blob_mask(rng, height, width):
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.25 * min(height, width)) ** 2
    return (inside * 255).astype(np.uint8)


def make_folder(root, stems=("a", "b", "c", "d", "e", "f"), *, image_ext=None, mask_ext=None):
    """root/images/<stem>.jpg and root/masks/<stem>.png, with a .tif and an upper-case .JPG among
    them and sizes that differ from image to image, as in Kvasir-SEG."""
    image_ext = dict({"c": ".tif", "d": ".JPG"}, **(image_ext or {}))
    mask_ext = dict({"e": ".bmp"}, **(mask_ext or {}))
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for n, stem in enumerate(stems):
        h, w = 40 + 3 * n, 50 - 2 * n
        ext = image_ext.get(stem, ".jpg")
        fmt = {".jpg": "JPEG", ".tif": "TIFF"}.get(ext.lower())
        Image.fromarray(smooth_rgb(rng, h, w)).save(root / "images" / f"{stem}{ext}", format=fmt)
        Image.fromarray(blob_mask(rng, h, w)).save(root / "masks" / f"{stem}{mask_ext.get(stem, '.png')}")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "polyps")


# ---- folders: items ---------------------------------------------------------------------------

def test_folder_items_have_the_documented_shapes_and_types(folder):
    (folder / "images" / "notes.txt").write_text("not an image, ignored")
    (folder / "images" / ".hidden.jpg").write_bytes(b"")
    ds = PolypFolder(folder, size=32)
    assert ds.stems == ["a", "b", "c", "d", "e", "f"] and len(ds) == 6
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (1, 32, 32) and y.dtype == torch.float32
        assert set(y.unique().tolist()) <= {0.0, 1.0} and y.sum() > 0
    with pytest.raises(IndexError):
        ds[6]
    torch.testing.assert_close(ds[-1][0], ds[5][0])


def test_images_are_resized_bilinear_and_normalised_with_imagenet_statistics(folder):
    ds = PolypFolder(folder, size=24)
    for i, name in [(0, "a.jpg"), (2, "c.tif"), (3, "d.JPG")]:
        with Image.open(folder / "images" / name) as im:
            src = np.array(im.convert("RGB").resize((24, 24), Image.BILINEAR))
        expected = torch.from_numpy(src).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(unnormalize(ds[i][0]), expected, rtol=0, atol=1 / 255)
        # the statistics are ImageNet's: a mid-grey pixel is not 0 after normalising
    assert MEAN == (0.485, 0.456, 0.406) and STD == (0.229, 0.224, 0.225)


def test_masks_are_thresholded_above_127_on_their_grayscale(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    levels = np.array([0, 100, 127, 128, 200, 255], dtype=np.uint8)
    gray = np.repeat(np.repeat(levels[None, :], 6, 0), 2, 1)  # 6 x 12, stripes of each level
    rgb = np.zeros((6, 12, 3), np.uint8)
    rgb[:, :6] = (255, 0, 0)  # luminance 76 -> background
    rgb[:, 6:] = (200, 200, 200)  # luminance 200 -> polyp
    for stem, mask in [("gray", gray), ("rgb", rgb)]:
        Image.fromarray(np.zeros((6, 12, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    ds = PolypFolder(root, size=12)
    # nearest-neighbour resize 6x12 -> 12x12 repeats rows; columns stay
    y_gray, y_rgb = ds[0][1][0], ds[1][1][0]
    assert y_gray[0].tolist() == [0] * 6 + [1] * 6 and (y_gray == y_gray[0]).all()
    assert y_rgb[0].tolist() == [0] * 6 + [1] * 6 and (y_rgb == y_rgb[0]).all()


def test_cache_keeps_items_after_the_files_are_gone(folder):
    cached, uncached = PolypFolder(folder, size=16), PolypFolder(folder, size=16, cache=False)
    x, y = cached[0]
    uncached[0]
    (folder / "images" / "a.jpg").unlink()
    x2, y2 = cached[0]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="a.jpg"):
        uncached[0]


# ---- splits ------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    stems = [f"img{i:02d}" for i in range(12)]
    root = make_folder(tmp_path / "d", stems)
    everything = PolypFolder(root, size=8).stems
    assert everything == stems

    def split(name, **kw):
        return PolypFolder(root, size=8, split=name, **kw).stems

    train, val = split("train", val_count=4), split("val", val_count=4)
    assert len(val) == 4 and len(train) == 8
    assert not set(train) & set(val) and sorted(train + val) == everything
    assert split("val", val_count=4) == val and split("train", val_count=4) == train
    assert any(split("val", val_count=4, seed=s) != val for s in range(1, 6))
    # default: round(0.12 * 12) = 1 validation image; val_fraction is honoured
    assert len(split("val")) == 1 and len(split("train")) == 11
    assert len(split("val", val_fraction=0.5)) == 6
    # the same split follows from the documented rule: a seeded torch permutation, first k are val
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3)).tolist()
    assert split("val", val_count=4, seed=3) == sorted(stems[i] for i in perm[:4])


def test_synthetic_split_is_disjoint_by_index_and_items_follow_their_index():
    train = SyntheticPolyps(20, size=32, split="train", val_count=5)
    val = SyntheticPolyps(20, size=32, split="val", val_count=5)
    assert len(train) == 15 and len(val) == 5
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(20))
    full = SyntheticPolyps(20, size=32)
    assert torch.equal(val[2][0], full[val.indices[2]][0])
    assert len(SyntheticPolyps(100, size=8, split="val")) == 12  # default 12%


# ---- augmentation ------------------------------------------------------------------------------

def test_augmentation_moves_image_and_mask_together(tmp_path):
    """The mask is the thresholded red channel of a lossless image, so after any flip/rotation the
    mask must still equal the thresholded red channel, and both must be the same transform."""
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    img = (rng.integers(0, 2, (4, 4, 3)) * 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)
    img[:8, :4, 0] = 255  # asymmetric, so every one of the 8 transforms differs
    img[8:, :, 0] = 0
    Image.fromarray(img).save(root / "images" / "x.png")
    Image.fromarray(img[..., 0]).save(root / "masks" / "x.png")
    x0, y0 = PolypFolder(root, size=16)[0]
    originals = list(zip(dihedral(x0), dihedral(y0)))
    assert len({tuple(y.flatten().tolist()) for _, y in originals}) == 8

    ds = PolypFolder(root, size=16, augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        x, y = ds[0]
        assert torch.equal(y[0] > 0.5, unnormalize(x)[0] > 0.5)
        matches = [k for k, (xt, yt) in enumerate(originals)
                   if torch.allclose(x, xt) and torch.equal(y, yt)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) >= 6  # the augmentation really varies
    torch.manual_seed(5)
    first = ds[0]
    torch.manual_seed(5)
    assert torch.equal(ds[0][0], first[0])  # drawn from torch's global RNG


def test_synthetic_augmentation_is_a_flip_or_rotation_of_the_item():
    x0, y0 = SyntheticPolyps(4, size=32)[1]
    torch.manual_seed(0)
    x, y = SyntheticPolyps(4, size=32, augment=True)[1]
    k = [i for i, yt in enumerate(dihedral(y0)) if torch.equal(y, yt)]
    assert k and any(torch.equal(x, dihedral(x0)[i]) for i in k)


# ---- errors ------------------------------------------------------------------------------------

def test_missing_folders_name_the_path_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*images/ and masks/"):
        PolypFolder(tmp_path / "nowhere")
    (tmp_path / "d" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"masks is missing.*images/ and masks/"):
        PolypFolder(tmp_path / "d")
    (tmp_path / "e" / "masks").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"images is missing"):
        PolypFolder(tmp_path / "e")


def test_unpaired_files_are_listed_with_counts_and_examples(tmp_path):
    stems = [f"s{i}" for i in range(10)]
    root = make_folder(tmp_path / "d", stems)
    for s in stems[:7]:
        (root / "masks" / f"{s}.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / "orphan.png")
    with pytest.raises(ValueError) as err:
        PolypFolder(root)
    msg = str(err.value)
    assert "10 images, 4 masks" in msg
    assert "7 images without a mask" in msg and "['s0', 's1', 's2', 's3', 's4']" in msg
    assert "s5" not in msg  # at most 5 examples
    assert "1 masks without an image" in msg and "orphan" in msg


def test_two_files_with_one_stem_are_rejected(folder):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "images" / "a.png")
    with pytest.raises(ValueError, match="stem 'a'"):
        PolypFolder(folder)


@pytest.mark.parametrize("which", ["images/b.jpg", "masks/b.png"])
def test_undecodable_file_is_named_when_its_item_is_loaded(folder, which):
    (folder / which).write_bytes(b"this is not an image")
    ds = PolypFolder(folder, size=16)  # listing does not decode
    ds[0]
    with pytest.raises(ValueError, match=which.split("/")[1]):
        ds[1]


def test_truncated_file_is_reported(folder):
    path = folder / "images" / "a.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="a.jpg"):
        PolypFolder(folder, size=16)[0]


def test_a_mask_of_another_size_is_refused_unless_stretching_is_allowed(folder):
    Image.fromarray(blob_mask(np.random.default_rng(1), 30, 5)).save(folder / "masks" / "b.png")
    with pytest.raises(ValueError, match=r"b\.png is 5x30 but its image .*b\.jpg is 48x43; they "
                                         r"must match, or allow_resize_masks=True"):
        PolypFolder(folder, size=16)[1]
    stretched = PolypFolder(folder, size=16, allow_resize_masks=True)[1][1]
    with Image.open(folder / "masks" / "b.png") as im:  # the mask alone, resized to the size
        expected = np.asarray(im.convert("L").resize((16, 16), Image.NEAREST)) > 127
    np.testing.assert_array_equal(stretched[0].numpy(), expected)


def test_verify_names_every_damaged_file_and_mismatched_mask_before_any_item(folder):
    (folder / "images" / "a.jpg").write_bytes((folder / "images" / "a.jpg").read_bytes()[:300])
    (folder / "images" / "c.tif").write_bytes(b"")
    (folder / "masks" / "d.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(folder / "masks" / "f.png")
    with pytest.raises(ValueError) as error:
        PolypFolder(folder).verify()
    message = str(error.value)
    assert message.startswith("4 problems in the data set: ") and "\n" not in message
    for name in ("images/a.jpg", "images/c.tif", "masks/d.png"):
        assert f"cannot decode {folder / name}" in message
    assert f"{folder / 'masks' / 'f.png'} is 9x7 but its image is 40x55" in message
    assert message.endswith("allow_resize_masks=True (--allow-resize-masks) stretches each mask to its image")
    with pytest.raises(ValueError, match="^3 problems") as error:  # the size is no problem then
        PolypFolder(folder, allow_resize_masks=True).verify()
    assert "stretches" not in str(error.value)
    with pytest.raises(ValueError, match="^4 problems"):  # both splits, before either is built
        polyp_datasets(str(folder), size=16, val_count=2, verify=True)
    train, val = polyp_datasets(str(folder), size=16, val_count=2)  # listing alone: no decoding
    assert len(train) + len(val) == 6


def test_verify_passes_a_sound_folder(folder):
    PolypFolder(folder).verify()


def test_empty_sets_and_bad_split_arguments(tmp_path, folder):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(ValueError, match="no images"):
        PolypFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="split"):
        PolypFolder(folder, split="test")
    with pytest.raises(ValueError, match="val_count=7"):
        PolypFolder(folder, val_count=7)
    with pytest.raises(ValueError, match="empty"):
        PolypFolder(folder, split="val", val_fraction=0.05)  # round(0.3) = 0
    with pytest.raises(ValueError, match="empty"):
        PolypFolder(folder, split="train", val_count=6)
    with pytest.raises(ValueError, match="empty"):
        PolypFolder(folder, split="val", val_count=0)
    with pytest.raises(ValueError, match="empty"):
        SyntheticPolyps(3, split="val")  # round(0.36) = 0
    with pytest.raises(ValueError, match="val_count=50"):
        SyntheticPolyps(40, val_count=50)
    with pytest.raises(ValueError, match="split"):
        SyntheticPolyps(40, split="validation")
    with pytest.raises(ValueError):
        SyntheticPolyps(0)


# ---- synthetic ---------------------------------------------------------------------------------

def test_synthetic_items_are_deterministic_and_depend_on_the_seed():
    ds = SyntheticPolyps(8, size=48)
    x, y = ds[3]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert y.shape == (1, 48, 48) and y.dtype == torch.float32
    assert set(y.unique().tolist()) == {0.0, 1.0}
    again = SyntheticPolyps(8, size=48)[3]
    assert torch.equal(x, ds[3][0]) and torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, ds[4][0])
    assert not torch.equal(x, SyntheticPolyps(8, size=48, seed=1)[3][0])
    # pixel values are those of an 8-bit image, like a file's
    pixels = unnormalize(x) * 255
    torch.testing.assert_close(pixels, pixels.round(), rtol=0, atol=1e-3)


def test_synthetic_masks_cover_a_plausible_polyp_area():
    ds = SyntheticPolyps(24, size=64)
    fractions = [ds[i][1].mean().item() for i in range(len(ds))]
    assert all(0.02 <= f <= 0.4 for f in fractions), fractions


def test_synthetic_polyps_are_visible_but_not_trivially_bright():
    """Polyp pixels differ from the mucosa on average, yet the brightest pixels are not all polyp
    (specular highlights sit on the mucosa too), so the task is not a brightness threshold."""
    image, mask = synthetic_polyp(0, 5, 128)
    inside, outside = image[mask == 1].astype(float), image[mask == 0].astype(float)
    assert np.abs(inside.mean(0) - outside.mean(0)).max() > 3
    assert image.std() > 10


def test_polyp_dataset_chooses_the_source(folder):
    assert isinstance(polyp_dataset(count=4, size=16), SyntheticPolyps)
    assert isinstance(polyp_dataset("synthetic", count=4, size=16), SyntheticPolyps)
    ds = polyp_dataset(str(folder), size=16, split="val", val_count=2)
    assert isinstance(ds, PolypFolder) and len(ds) == 2


# ---- real data ---------------------------------------------------------------------------------

def test_kvasir_seg_when_present():
    if not (KVASIR / "images").is_dir():
        pytest.skip(f"no Kvasir-SEG at {KVASIR}")
    ds = PolypFolder(KVASIR, size=64, split="val", val_count=120)
    assert len(ds) == 120
    ds.verify()  # every file decodes, every mask has its image's size
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and y.shape == (1, 64, 64) and y.sum() > 0
