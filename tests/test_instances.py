"""Instance targets, watershed and instance metrics against answers worked out by hand, and the
metrics against a slow pixel-by-pixel reference."""

import numpy as np
import pytest
from scipy import ndimage

from polyprune_ext.tasks.nuclei.instances import (InstanceMetrics, aji, instance_targets, panoptic_quality,
                                     watershed_instances)


def label_image(rows):
    return np.array(rows, dtype=np.int64)


# Two 2x2 nuclei (4 px each) side by side; most cases below predict against this truth.
TWO = label_image([[1, 1, 2, 2, 0],
                   [1, 1, 2, 2, 0],
                   [0, 0, 0, 0, 0]])


def test_perfect_prediction():
    assert aji(TWO, TWO) == 1.0
    assert panoptic_quality(TWO, TWO) == {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 2, "fp": 0, "fn": 0}


def test_ids_need_not_be_consecutive():
    true = np.where(TWO == 1, 7, np.where(TWO == 2, 3, 0))
    pred = np.where(TWO == 1, 100, np.where(TWO == 2, 5, 0)).astype(np.uint16)
    assert aji(true, pred) == 1.0 and panoptic_quality(true, pred)["tp"] == 2
    no_background = np.array([[4, 4, 9]])
    assert aji(no_background, no_background) == 1.0


def test_merged_nuclei():
    pred = (TWO > 0).astype(np.int64)  # one 8 px prediction covering both
    # both nuclei pair with it: C = 4 + 4, U = 8 + 8 (its area counts in both unions)
    assert aji(TWO, pred) == pytest.approx(8 / 16)
    # IoU of each nucleus with it is 4/8 = 0.5 exactly: no match. TP 0, FP 1, FN 2
    assert panoptic_quality(TWO, pred) == {"pq": 0.0, "dq": 0.0, "sq": 0.0, "tp": 0, "fp": 1, "fn": 2}


def test_split_nucleus():
    true = label_image([[1, 1, 1, 2, 2],
                        [1, 1, 1, 2, 2]])  # nucleus 1: 6 px, nucleus 2: 4 px
    pred = label_image([[1, 1, 3, 2, 2],
                        [1, 1, 3, 2, 2]])  # nucleus 1 split into 4 px + 2 px
    # nucleus 1 pairs with pred 1 (IoU 4/6 beats 2/6): C += 4, U += 6
    # nucleus 2 pairs with pred 2 (IoU 1):             C += 4, U += 4
    # pred 3 unpaired:                                          U += 2   -> AJI = 8/12
    assert aji(true, pred) == pytest.approx(8 / 12)
    # matches (IoU > 0.5): 4/6 and 1 -> TP 2, FP 1 (pred 3), FN 0
    # DQ = 2 / (2 + 0.5) = 0.8, SQ = (2/3 + 1) / 2 = 5/6, PQ = 0.8 * 5/6 = 2/3
    quality = panoptic_quality(true, pred)
    assert (quality["tp"], quality["fp"], quality["fn"]) == (2, 1, 0)
    assert quality["dq"] == pytest.approx(0.8) and quality["sq"] == pytest.approx(5 / 6)
    assert quality["pq"] == pytest.approx(2 / 3)


def test_missing_nucleus():
    pred = np.where(TWO == 1, 1, 0)
    # nucleus 1: C += 4, U += 4; nucleus 2 overlaps nothing: U += 4 -> AJI = 4/8
    assert aji(TWO, pred) == pytest.approx(0.5)
    # TP 1, FN 1: DQ = 1 / (1 + 0.5) = 2/3, SQ = 1
    quality = panoptic_quality(TWO, pred)
    assert (quality["tp"], quality["fp"], quality["fn"]) == (1, 0, 1)
    assert quality["dq"] == pytest.approx(2 / 3) and quality["pq"] == pytest.approx(2 / 3)


def test_extra_false_positive():
    pred = TWO.copy()
    pred[2, 2:5] = 9  # a 3 px prediction on background
    # C = 4 + 4, U = 4 + 4 + 3 -> AJI = 8/11
    assert aji(TWO, pred) == pytest.approx(8 / 11)
    # TP 2, FP 1: DQ = 2 / (2 + 0.5) = 0.8, SQ = 1
    quality = panoptic_quality(TWO, pred)
    assert (quality["tp"], quality["fp"], quality["fn"]) == (2, 1, 0)
    assert quality["pq"] == pytest.approx(0.8) and quality["sq"] == 1.0


def test_aji_pairs_by_iou_not_by_intersection():
    true = label_image([[1, 1, 0, 0],
                        [1, 1, 0, 0]])  # 4 px
    pred = label_image([[1, 2, 2, 2],
                        [2, 2, 2, 2]])  # pred 1: 1 px in the nucleus; pred 2: 3 px in it + 4 out
    # IoU with pred 1 = 1/4, with pred 2 = 3/8: pred 2 wins although pred 1 lies wholly inside.
    # C = 3, U = 8 + pred 1 unpaired 1 = 9
    assert aji(true, pred) == pytest.approx(3 / 9)


def test_iou_of_exactly_one_half_is_not_a_match():
    true = label_image([[1, 1, 1, 1]])
    half = label_image([[1, 1, 0, 0]])  # IoU 2/4
    three_quarters = label_image([[1, 1, 1, 0]])  # IoU 3/4
    assert panoptic_quality(true, half)["tp"] == 0
    assert panoptic_quality(true, three_quarters)["sq"] == pytest.approx(0.75)


def test_empty_images():
    empty = np.zeros_like(TWO)
    assert aji(empty, empty) == 1.0
    assert panoptic_quality(empty, empty) == {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    assert aji(TWO, empty) == 0.0 and aji(empty, TWO) == 0.0
    # nothing predicted: TP 0, FN 2 -> DQ = 0 / (0 + 0 + 1) = 0
    assert panoptic_quality(TWO, empty) == {"pq": 0.0, "dq": 0.0, "sq": 0.0, "tp": 0, "fp": 0, "fn": 2}
    assert panoptic_quality(empty, TWO)["fp"] == 2


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        aji(TWO, TWO[:2])
    with pytest.raises(ValueError, match="integer"):
        panoptic_quality(TWO, TWO.astype(np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        aji(TWO, -TWO)


def test_instance_metrics_average_over_images():
    metrics = InstanceMetrics()
    metrics.update(TWO, TWO)  # AJI 1, PQ 1, DQ 1, SQ 1
    metrics.update(TWO, np.where(TWO == 1, 1, 0))  # missing nucleus: AJI 1/2, PQ 2/3, DQ 2/3, SQ 1
    result = metrics.compute()
    assert result["images"] == 2
    assert result["aji"] == pytest.approx(0.75)  # (1 + 1/2) / 2
    assert result["pq"] == pytest.approx(5 / 6) and result["dq"] == pytest.approx(5 / 6)  # (1 + 2/3) / 2
    assert result["sq"] == 1.0
    metrics.reset()
    with pytest.raises(ValueError, match="before any update"):
        metrics.compute()


def reference_scores(true, pred):
    """(AJI, PQ, TP) by a double loop over nucleus pairs with boolean masks: slow but plain."""
    true_ids = [i for i in np.unique(true) if i != 0]
    pred_ids = [j for j in np.unique(pred) if j != 0]
    if not true_ids and not pred_ids:
        return 1.0, 1.0, 0
    intersection_sum, union_sum, paired, matched_ious = 0, 0, set(), []
    for i in true_ids:
        nucleus = true == i
        best, best_iou = None, 0.0
        for j in pred_ids:
            found = pred == j
            iou = (nucleus & found).sum() / (nucleus | found).sum()
            if iou > 0.5:
                matched_ious.append(iou)
            if iou > best_iou:
                best, best_iou = j, iou
        if best is None:
            union_sum += nucleus.sum()
        else:
            intersection_sum += (nucleus & (pred == best)).sum()
            union_sum += (nucleus | (pred == best)).sum()
            paired.add(best)
    union_sum += sum((pred == j).sum() for j in pred_ids if j not in paired)
    tp = len(matched_ious)
    dq = tp / (tp + (len(pred_ids) - tp) / 2 + (len(true_ids) - tp) / 2)
    return intersection_sum / union_sum, dq * (np.mean(matched_ious) if tp else 0.0), tp


def random_rectangles(rng, size=16):
    labels = np.zeros((size, size), dtype=np.int64)
    for _ in range(rng.integers(0, 6)):
        top, left = rng.integers(0, size - 2, 2)
        height, width = rng.integers(2, 7, 2)
        labels[top:top + height, left:left + width] = rng.integers(1, 50)  # ids repeat, overlap
    return labels


def test_metrics_match_a_pixel_by_pixel_reference():
    rng = np.random.default_rng(0)
    for _ in range(40):
        true = random_rectangles(rng)
        # the truth shifted by up to a pixel, that with a rectangle painted over it, or unrelated
        shifted = np.roll(true, tuple(rng.integers(-1, 2, 2)), (0, 1))
        painted = np.where(random_rectangles(rng) > 0, random_rectangles(rng), shifted)
        pred = [shifted, painted, random_rectangles(rng)][rng.integers(3)]
        expected_aji, expected_pq, expected_tp = reference_scores(true, pred)
        quality = panoptic_quality(true, pred)
        assert aji(true, pred) == pytest.approx(expected_aji)
        assert quality["pq"] == pytest.approx(expected_pq) and quality["tp"] == expected_tp


def test_distance_of_one_square_nucleus():
    labels = np.zeros((9, 9), dtype=np.int64)
    labels[2:7, 2:7] = 1  # 5x5 square
    mask, distance = instance_targets(labels)
    assert mask.dtype == np.float32 and distance.dtype == np.float32
    assert np.array_equal(mask, labels.astype(np.float32))
    # centre (4, 4) is 3 px from the nearest outside pixel (row or column 1 or 7): the maximum
    assert distance[4, 4] == 1.0 and distance.max() == 1.0
    assert distance[2, 2] == pytest.approx(1 / 3)  # a corner pixel: 1 px from outside, / 3
    assert distance[labels == 0].max() == 0.0


def test_touching_nuclei_meet_at_small_distances():
    labels = np.zeros((7, 12), dtype=np.int64)
    labels[1:6, 1:6], labels[1:6, 6:11] = 1, 2  # two 5x5 squares sharing the border cols 5 | 6
    _, distance = instance_targets(labels)
    assert distance[3, 3] == 1.0 and distance[3, 8] == 1.0
    # On the shared border each pixel is 1 px from the other nucleus, so 1/3 (the union of both,
    # a 5x10 rectangle, would give 3/3 there instead).
    assert distance[3, 5] == pytest.approx(1 / 3) and distance[3, 6] == pytest.approx(1 / 3)


def test_image_edge_counts_as_outside():
    labels = np.zeros((5, 5), dtype=np.int64)
    labels[:3, :3] = 1  # 3x3 square in the corner
    labels[4, 4] = 2  # a single pixel
    _, distance = instance_targets(labels)
    # (1, 1) is 2 px from row/column -1 beyond the edge, as from row/column 3 inside
    assert distance[1, 1] == 1.0 and distance[0, 0] == pytest.approx(1 / 2)
    assert distance[4, 4] == 1.0


def test_targets_with_non_consecutive_ids():
    labels = np.zeros((7, 12), dtype=np.int64)
    labels[1:6, 1:6], labels[1:6, 6:11] = 1, 2
    renamed = np.where(labels == 1, 10**9, np.where(labels == 2, 5, 0))
    for got, want in zip(instance_targets(renamed), instance_targets(labels)):
        assert np.array_equal(got, want)


def test_targets_match_a_whole_image_transform_per_nucleus():
    rng = np.random.default_rng(1)
    labels = random_rectangles(rng, size=32)
    _, distance = instance_targets(labels)
    for i in np.unique(labels)[1:]:
        whole = ndimage.distance_transform_edt(np.pad(labels == i, 1))[1:-1, 1:-1]
        expected = (whole / whole.max()).astype(np.float32)
        assert np.allclose(distance[labels == i], expected[labels == i])


def test_targets_reject_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        instance_targets(np.zeros((2, 4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        instance_targets(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        instance_targets(np.full((4, 4), -1))


def touching_discs():
    """Two discs of radius 8 whose centres are 14 px apart, the overlap split by nearest centre."""
    rows, cols = np.mgrid[:32, :40]
    first, second = np.hypot(rows - 16, cols - 13), np.hypot(rows - 16, cols - 27)
    labels = np.zeros((32, 40), dtype=np.int64)
    labels[(first <= 8) & (first <= second)] = 1
    labels[(second <= 8) & (second < first)] = 2
    return labels


@pytest.mark.parametrize("markers", [{}, {"h": 0.3}, {"h": None}], ids=["default", "h-maxima", "threshold"])
def test_watershed_separates_touching_discs(markers):
    labels = touching_discs()
    mask, distance = instance_targets(labels)
    assert ndimage.label(mask)[1] == 1  # one blob: connected components alone would merge them
    found = watershed_instances(mask, distance, **markers)
    assert found.max() == 2 and set(np.unique(found)) == {0, 1, 2}
    assert aji(labels, found) > 0.9


def test_default_markers_keep_nuclei_whose_peaks_stay_low():
    """A network that predicts the distance at 0.4 of the targets' height: no pixel passes the 0.5
    threshold, so thresholded markers find nothing, while the default h-maxima find both nuclei."""
    labels = touching_discs()
    mask, distance = instance_targets(labels)
    assert not watershed_instances(mask, 0.4 * distance, h=None).any()
    found = watershed_instances(mask, 0.4 * distance)
    assert found.max() == 2 and aji(labels, found) > 0.9


def test_watershed_drops_small_instances_and_relabels():
    labels = touching_discs()
    labels[0:2, 0:2] = 3  # a 4 px speck, first in raster order
    mask, distance = instance_targets(labels)
    assert set(np.unique(watershed_instances(mask, distance, min_size=1))) == {0, 1, 2, 3}
    found = watershed_instances(mask, distance)  # min_size 10
    assert set(np.unique(found)) == {0, 1, 2}
    assert not found[0:2, 0:2].any()


def test_watershed_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        watershed_instances(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2-D"):
        watershed_instances(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="h must be > 0"):
        watershed_instances(np.zeros((4, 4)), np.zeros((4, 4)), h=0)
