"""polyprune_ext.tasks.nuclei.data: DSB 2018 and label-image folders (built here in tmp_path with Pillow),
the synthetic H&E set, splits, augmentation and the errors a wrong folder should give."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyprune_ext.tasks.images import denormalize as unnormalize
from polyprune_ext.tasks.nuclei import (DSB2018Folder, LabelFolder, SyntheticNuclei, nuclei_dataset,
                                        synthetic_nuclei)
from polyprune_ext.testing import dihedral

DSB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dsb2018-stage1-test"

# Hand-drawn 8x8 instance maps of the two DSB fixture samples; in "a" nucleus 3 is drawn over 2.
LABELS_A = np.array([[1, 1, 0, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0, 0, 0],
                     [0, 0, 0, 2, 2, 2, 0, 0],
                     [0, 0, 0, 2, 3, 3, 3, 0],
                     [0, 0, 0, 2, 3, 3, 3, 0],
                     [0, 0, 0, 0, 3, 3, 3, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0]])
LABELS_B = np.array([[0, 0, 0, 0, 0, 0, 0, 0],
                     [0, 1, 1, 1, 0, 0, 0, 0],
                     [0, 1, 1, 1, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 2, 2, 0],
                     [0, 0, 0, 0, 0, 2, 2, 0],
                     [0, 0, 0, 0, 0, 2, 2, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0]])
SQUARES_A = [(0, 2, 0, 2), (2, 5, 3, 6), (3, 6, 4, 7)]  # (row0, row1, col0, col1) of each mask
SQUARES_B = [(1, 3, 1, 4), (4, 7, 5, 7)]


def rgb(seed, height=8, width=8):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_dsb(root):
    """Two samples: "a" an RGBA image with three masks (the third overlapping the second), "b" a
    grayscale image with two; mask files named so that file name order is drawing order."""
    for name, squares in (("a", SQUARES_A), ("b", SQUARES_B)):
        (root / name / "images").mkdir(parents=True)
        (root / name / "masks").mkdir()
        for k, (r0, r1, c0, c1) in enumerate(squares):
            mask = np.zeros((8, 8), dtype=np.uint8)
            mask[r0:r1, c0:c1] = 255
            Image.fromarray(mask).save(root / name / "masks" / f"{name}_{k}.png")
    alpha = np.full((8, 8, 1), 128, dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb(0), alpha], -1), "RGBA").save(root / "a" / "images" / "a.png")
    Image.fromarray(rgb(1)[..., 0]).save(root / "b" / "images" / "b.png")
    return root


def make_label_folder(root, stems=("p", "q", "r", "s", "t")):
    """images/<stem>.png with 16-bit PNG label images (ids beyond 255) in labels/<stem>.png."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for n, stem in enumerate(stems):
        Image.fromarray(rgb(n, 6, 10)).save(root / "images" / f"{stem}.png")
        labels = np.zeros((6, 10), dtype=np.uint16)
        labels[1:3, 1:4], labels[3:6, 5:9] = 300 + n, 65535
        Image.fromarray(labels).save(root / "labels" / f"{stem}.png")
    return root


def touching_pairs(labels):
    """How many 4-adjacent pixel pairs hold two different nuclei."""
    count = 0
    for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
        count += int(((a > 0) & (b > 0) & (a != b)).sum())
    return count


# ---- DSB 2018 folders -------------------------------------------------------------------------

def test_dsb_items_reproduce_the_drawn_instances_later_masks_winning(tmp_path):
    ds = DSB2018Folder(make_dsb(tmp_path / "dsb"), size=8)
    assert ds.names == ["a", "b"] and len(ds) == 2
    for (x, y), expected in zip((ds[0], ds[1]), (LABELS_A, LABELS_B)):
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert y.shape == (8, 8) and y.dtype == torch.int64
        np.testing.assert_array_equal(y.numpy(), expected)


def test_rgba_and_grayscale_images_become_normalised_rgb(tmp_path):
    ds = DSB2018Folder(make_dsb(tmp_path / "dsb"), size=8)
    rgba_without_alpha = torch.tensor(rgb(0)).permute(2, 0, 1).float()
    torch.testing.assert_close(unnormalize(ds[0][0]) * 255, rgba_without_alpha, atol=1e-3, rtol=0)
    expected_gray = torch.tensor(rgb(1)[..., 0]).float().expand(3, 8, 8)
    torch.testing.assert_close(unnormalize(ds[1][0]) * 255, expected_gray, atol=1e-3, rtol=0)


def test_labels_are_resized_nearest_and_keep_their_ids(tmp_path):
    root = make_dsb(tmp_path / "dsb")
    up = DSB2018Folder(root, size=16)[0][1].numpy()
    np.testing.assert_array_equal(up, LABELS_A.repeat(2, 0).repeat(2, 1))
    for size in (5, 11, 13):
        y = DSB2018Folder(root, size=size)[0][1]
        assert set(y.unique().tolist()) <= {0, 1, 2, 3}  # no id invented between 0 and 3


def test_dsb_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DSB2018Folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no sample folders"):
        DSB2018Folder(tmp_path / "empty")

    root = make_dsb(tmp_path / "no_images")
    (root / "a" / "images" / "a.png").unlink()
    with pytest.raises(ValueError, match=r"no_images/a .*0 images"):
        DSB2018Folder(root)
    (root / "a" / "images").rmdir()
    with pytest.raises(FileNotFoundError, match=r"no_images/a has no images/"):
        DSB2018Folder(root)

    root = make_dsb(tmp_path / "no_masks")
    for path in (root / "b" / "masks").iterdir():
        path.unlink()
    (root / "b" / "masks").rmdir()
    with pytest.raises(FileNotFoundError, match=r"no_masks/b has no masks/"):
        DSB2018Folder(root)


def test_dsb_unreadable_or_mismatched_files_are_named_when_loaded(tmp_path):
    root = make_dsb(tmp_path / "broken")
    (root / "b" / "masks" / "b_1.png").write_bytes(b"not a png")
    ds = DSB2018Folder(root, size=8)
    ds[0]
    with pytest.raises(ValueError, match=r"cannot decode image file .*b_1\.png"):
        ds[1]

    root = make_dsb(tmp_path / "mismatch")
    Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(root / "a" / "masks" / "a_2.png")
    with pytest.raises(ValueError, match=r"a_2\.png is 8x9 but its image .*a\.png is 8x8"):
        DSB2018Folder(root)[0]


def test_dsb_verify_names_damaged_and_mismatched_masks_and_resizes_them_when_allowed(tmp_path):
    root = make_dsb(tmp_path / "dsb")
    (root / "b" / "masks" / "b_0.png").write_bytes(b"not a png")
    small = np.zeros((4, 4), dtype=np.uint8)
    small[2:, 2:] = 255  # a_2's square (rows 3-6, cols 4-7 of 8) at half the resolution
    Image.fromarray(small).save(root / "a" / "masks" / "a_2.png")
    with pytest.raises(ValueError, match=r"^2 problems in the data set: cannot decode .*b_0\.png.*; "
                                         r".*a_2\.png is 4x4 but its image is 8x8; allow_resize_masks"):
        nuclei_dataset(root).verify()
    (root / "b" / "masks" / "b_0.png").unlink()
    ds = DSB2018Folder(root, size=8, allow_resize_masks=True)
    ds.verify()
    expected = np.zeros((8, 8), dtype=np.int64)
    for k, (r0, r1, c0, c1) in enumerate(SQUARES_A[:2]):
        expected[r0:r1, c0:c1] = k + 1
    expected[4:8, 4:8] = 3  # nucleus 3 resized from 4x4 with nearest neighbour: each pixel 2x2
    np.testing.assert_array_equal(ds[0][1].numpy(), expected)


def test_label_folder_resizes_labels_of_another_size_when_allowed(tmp_path):
    root = make_label_folder(tmp_path / "lab", stems=("p",))
    labels = np.zeros((3, 5), dtype=np.uint16)
    labels[1, 1:3] = 700
    Image.fromarray(labels).save(root / "labels" / "p.png")
    with pytest.raises(ValueError, match=r"p\.png is 5x3 but its image .*p\.png is 10x6"):
        LabelFolder(root)[0]
    y = LabelFolder(root, size=10, allow_resize_masks=True)[0][1].numpy()
    # to the image's 10x6 (each id pixel 2x2), then to the item's 10x10 as every label image is
    np.testing.assert_array_equal(y, pil_nearest(labels.repeat(2, 0).repeat(2, 1), 10))


# ---- label-image folders ----------------------------------------------------------------------

def pil_nearest(labels, size):
    """The oracle for label resizing: PIL's NEAREST on 32-bit integers."""
    return np.asarray(Image.fromarray(labels.astype(np.int32)).resize((size, size), Image.NEAREST))


def test_label_folder_reads_16_bit_ids_exactly_and_resizes_like_pil(tmp_path):
    root = make_label_folder(tmp_path / "lab")
    ds = LabelFolder(root, size=20)
    assert ds.names == ["p", "q", "r", "s", "t"]
    x, y = ds[2]
    assert x.shape == (3, 20, 20) and y.shape == (20, 20) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == {0, 302, 65535}
    stored = np.asarray(Image.open(root / "labels" / "r.png"))
    np.testing.assert_array_equal(y.numpy(), pil_nearest(stored, 20))
    bilinear = np.asarray(Image.fromarray(rgb(2, 6, 10)).resize((20, 20), Image.BILINEAR))
    torch.testing.assert_close(unnormalize(x) * 255, torch.tensor(bilinear).permute(2, 0, 1).float(),
                               atol=1e-3, rtol=0)


def test_label_folder_reads_32_bit_tiff_labels(tmp_path):
    root = make_label_folder(tmp_path / "lab", stems=("p",))
    (root / "labels" / "p.png").unlink()
    labels = np.zeros((6, 10), dtype=np.int32)
    labels[2:5, 2:7], labels[0, 9] = 70000, 3
    Image.fromarray(labels).save(root / "labels" / "p.tif")
    for size in (10, 7):
        np.testing.assert_array_equal(LabelFolder(root, size=size)[0][1].numpy(), pil_nearest(labels, size))


def test_label_folder_errors(tmp_path):
    root = make_label_folder(tmp_path / "lab")
    (root / "labels" / "q.png").unlink()
    (root / "labels" / "extra.tif").write_bytes(b"")
    with pytest.raises(ValueError, match=r"do not pair up.*\['q'\].*\['extra'\]"):
        LabelFolder(root)

    root = make_label_folder(tmp_path / "bad")
    (root / "labels" / "r.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot decode label image file .*r\.png"):
        LabelFolder(root)[2]

    root = make_label_folder(tmp_path / "rgb_labels", stems=("p",))
    Image.fromarray(rgb(0, 6, 10)).save(root / "labels" / "p.png")
    with pytest.raises(ValueError, match=r"p\.png must hold one channel"):
        LabelFolder(root)[0]

    with pytest.raises(FileNotFoundError, match="labels"):
        (tmp_path / "only_images" / "images").mkdir(parents=True)
        LabelFolder(tmp_path / "only_images")


# ---- splits, caching, source choice ------------------------------------------------------------

def test_folder_splits_are_disjoint_and_cover_the_set(tmp_path):
    root = make_label_folder(tmp_path / "lab", stems=tuple("abcdefghij"))
    train = LabelFolder(root, split="train", val_count=3, seed=4).names
    val = LabelFolder(root, split="val", val_count=3, seed=4).names
    assert len(val) == 3 and not set(train) & set(val) and sorted(train + val) == list("abcdefghij")


def test_synthetic_splits_are_disjoint_and_cover_the_indices():
    train = SyntheticNuclei(50, size=16, split="train", seed=2)
    val = SyntheticNuclei(50, size=16, split="val", seed=2)
    assert len(val) == 6 and not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(50))
    x, y = val[1]
    image, labels = synthetic_nuclei(2, val.indices[1], 16)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_cache_keeps_items_after_the_files_are_gone(tmp_path):
    root = make_dsb(tmp_path / "dsb")
    cached, uncached = DSB2018Folder(root, size=8), DSB2018Folder(root, size=8, cache=False)
    x, y = cached[1]
    for path in (root / "b" / "masks").iterdir():
        path.unlink()
    x2, y2 = cached[1]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match=r"b_0\.png"):  # re-read: the listed files are gone
        uncached[1]


def test_nuclei_dataset_chooses_the_source(tmp_path):
    assert isinstance(nuclei_dataset(count=3, size=16), SyntheticNuclei)
    assert isinstance(nuclei_dataset("synthetic", count=3, size=16), SyntheticNuclei)
    assert isinstance(nuclei_dataset(make_dsb(tmp_path / "dsb"), size=8), DSB2018Folder)
    assert isinstance(nuclei_dataset(make_label_folder(tmp_path / "lab"), size=8), LabelFolder)
    (tmp_path / "other" / "images").mkdir(parents=True)
    for source in (tmp_path / "other", tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError, match=r"masks/.*labels/"):
            nuclei_dataset(source)


# ---- synthetic nuclei -------------------------------------------------------------------------

def test_synthetic_items_have_the_documented_shapes_and_normalisation():
    ds = SyntheticNuclei(4, size=64, seed=1)
    x, y = ds[3]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (64, 64) and y.dtype == torch.int64
    image, labels = synthetic_nuclei(1, 3, 64)
    torch.testing.assert_close(unnormalize(x) * 255, torch.tensor(image).permute(2, 0, 1).float(),
                               atol=1e-3, rtol=0)
    assert sorted(np.unique(labels)) == list(range(labels.max() + 1))  # ids 0..K, no gaps


def test_synthetic_items_are_deterministic_and_depend_on_the_seed():
    first, again = synthetic_nuclei(0, 7), synthetic_nuclei(0, 7)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other_seed, other_index = synthetic_nuclei(1, 7), synthetic_nuclei(0, 8)
    assert not np.array_equal(first[0], other_seed[0]) and not np.array_equal(first[0], other_index[0])
    assert torch.equal(SyntheticNuclei(10)[7][1], SyntheticNuclei(10)[7][1])


def test_synthetic_tiles_are_crowded_with_touching_nuclei_that_look_dark():
    for index in range(6):
        image, labels = synthetic_nuclei(0, index)
        ids, pixels = np.unique(labels[labels > 0], return_counts=True)
        assert len(ids) >= 15 and pixels.min() >= 8
        assert touching_pairs(labels) > 0
        nuclei, background = image[labels > 0].mean(0), image[labels == 0].mean(0)
        assert (nuclei < background - 40).all()  # haematoxylin purple on pale pink


def test_augmentation_moves_image_and_labels_together():
    plain, augmented = SyntheticNuclei(3, size=48), SyntheticNuclei(3, size=48, augment=True)
    torch.manual_seed(0)
    seen = set()
    for draw in range(16):
        x, y = plain[draw % 3]
        xa, ya = augmented[draw % 3]
        image_matches = [k for k, t in enumerate(dihedral(x)) if torch.equal(t, xa)]
        label_matches = [k for k, t in enumerate(dihedral(y)) if torch.equal(t, ya)]
        assert len(image_matches) == 1 and image_matches[0] in label_matches
        seen.add(image_matches[0])
    assert len(seen) >= 4  # the transforms do vary


# ---- real data --------------------------------------------------------------------------------

@pytest.mark.skipif(not DSB.is_dir(), reason="no DSB 2018 copy in ../shared/data")
def test_dsb2018_stage1_test_when_present():
    ds = nuclei_dataset(DSB)
    assert isinstance(ds, DSB2018Folder) and len(ds) == 65
    total = 0
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 256, 256) and y.shape == (256, 256) and y.dtype == torch.int64
        count = len(y.unique()) - 1
        assert count > 0
        total += count
    assert total > 3500  # 4152 nuclei in all; a few small ones may vanish at 256
