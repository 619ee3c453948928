"""Nuclei instances: training targets, watershed post-processing and instance metrics.

Nuclei touch, so a binary mask cannot tell them apart. Following Naylor et al. (2019) and Mahbod
et al. (2022), the network predicts a semantic nucleus/background map and, for every nucleus, its
distance to the nucleus boundary normalised to peak at 1. The distance map dips at the contact
between two nuclei, so a marker-controlled watershed on it, inside the predicted mask, splits
touching nuclei (watershed_instances). instance_targets builds both targets from a label image.

Pixel Dice cannot see a merge or a split, so instances are scored with the two usual metrics:
  - AJI, the Aggregated Jaccard Index of Kumar et al. (2017), in its original form: each true
    nucleus is paired with the prediction of highest IoU, and the intersections and unions of all
    pairs, plus the area of every prediction never paired, are summed before dividing;
  - PQ, the panoptic quality of Kirillov et al. (2019): IoU > 0.5 matches, then detection quality
    (an F1 score over nuclei) times segmentation quality (the mean IoU of the matches).
Both are computed per image and averaged over images, as in Mahbod et al. (InstanceMetrics).

Label images are 2-D integer arrays: 0 is background, every other id one nucleus. Ids need not be
consecutive; they are relabelled 1..K internally, in increasing order of the original ids.
"""

from typing import Optional

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed


def _check_labels(labels, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) label image, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer instance ids, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} must hold ids >= 0 (0 is background), got {labels.min()}")
    return labels


def _consecutive(labels: np.ndarray) -> tuple:
    """(labels relabelled 0..K keeping 0 as background and the order of the ids, K)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids.size and ids[0] == 0:
        return inverse, ids.size - 1
    return inverse + 1, ids.size  # no background pixel: the first id must become 1, not 0


def instance_targets(labels: np.ndarray) -> tuple:
    """(mask, distance), both float32 (H, W), the training targets for a label image (H, W).

    mask is 1 on nuclei. distance is, for each nucleus on its own, the Euclidean distance of its
    pixels to the nearest pixel outside it, divided by its maximum: every nucleus peaks at exactly
    1 and background is 0. A neighbouring nucleus counts as outside, so touching nuclei meet at
    small values - the valley the watershed cuts along. Pixels beyond the image edge count as
    outside too, so a nucleus cut by the edge peaks inside its visible part, where the network
    can see it.

    Each nucleus is transformed within its bounding box padded by one outside pixel; the nearest
    outside pixel is never farther than that border, so the result equals a transform of the
    whole image per nucleus, at a fraction of the cost.
    """
    labels = _check_labels(labels)
    consecutive, _ = _consecutive(labels)
    distance = np.zeros(labels.shape, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(consecutive), start=1):
        inside = consecutive[box] == index
        to_outside = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        distance[box][inside] = to_outside[inside] / to_outside.max()
    return (labels > 0).astype(np.float32), distance


def watershed_instances(probability: np.ndarray, distance: np.ndarray, *, mask_threshold: float = 0.5,
                        marker_threshold: float = 0.5, h: Optional[float] = 0.1,
                        min_size: int = 10) -> np.ndarray:
    """Instance label image (H, W) int32, ids 1..K, from the network's two outputs.

    probability is the semantic branch after sigmoid and distance the regression branch as
    predicted, both float (H, W). Nuclei are the pixels with probability > mask_threshold, split
    by a watershed on -distance, so each basin grows from a marker down the distance map and
    neighbours meet at its valleys. The markers, one per nucleus, are the connected regions (within
    the mask) of either
      - the h-maxima of distance (h > 0, the default): peaks that rise at least h above the
        lowest level at which they join a higher peak. This keeps faint nuclei whatever their
        height and ignores ripples shallower than h, at some extra cost. The distance outside the
        mask is ignored (set to its minimum), so no prediction there can hide a nucleus's peak;
      - distance > marker_threshold (h is None): the inner part of each nucleus, as targets peak
        at 1. Simple and fast, but a nucleus whose predicted peak stays below the threshold gets
        no marker and is lost, and two cores that touch make one marker.
    h-maxima are the default because networks do not reach the targets' peaks: on DSB 2018 (see
    benchmarks/RESULTS.md, bench_nuclei_markers) the median predicted peak was 0.51-0.66 before
    pruning and 0.18 after layer-wise pruning to CR 20, so a 0.5 threshold lost a third to all
    of the nuclei; h = 0.1 raised the AJI by 6-15 points before pruning and kept it from 0.01 to
    0.36 at that CR.
    Mask pixels that no marker reaches stay background. Instances smaller than min_size pixels,
    mostly specks of noise in the probability map, are removed, and the rest relabelled 1..K.
    """
    probability, distance = np.asarray(probability), np.asarray(distance)
    if probability.ndim != 2 or probability.shape != distance.shape:
        raise ValueError(f"probability and distance must be 2-D (H, W) maps of the same shape, got "
                         f"{probability.shape} and {distance.shape}")
    mask = probability > mask_threshold
    if h is None:
        peaks = distance > marker_threshold
    elif h > 0:
        peaks = h_maxima(np.where(mask, distance, distance.min()), h).astype(bool)
    else:
        raise ValueError(f"h must be > 0 (or None for thresholded markers), got {h}")
    markers, _ = ndimage.label(peaks & mask)
    labels = watershed(-distance, markers, mask=mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    new_ids = np.zeros(sizes.size, dtype=np.int32)
    new_ids[keep] = np.arange(1, keep.sum() + 1)
    return new_ids[labels]


def _overlaps(true, pred) -> tuple:
    """(intersection, union, true_area, pred_area) of the nuclei of two label images.

    intersection[i, j] and union[i, j] are pixel counts of true nucleus i+1 and predicted nucleus
    j+1 (after relabelling 1..K); the intersections of all pairs come from one pass over the pixels.
    """
    true, pred = _check_labels(true, "true"), _check_labels(pred, "pred")
    if true.shape != pred.shape:
        raise ValueError(f"true and pred must have the same shape, got {true.shape} and {pred.shape}")
    true, true_count = _consecutive(true)
    pred, pred_count = _consecutive(pred)
    pairs = np.bincount((true * (pred_count + 1) + pred).ravel(),
                        minlength=(true_count + 1) * (pred_count + 1))
    pairs = pairs.reshape(true_count + 1, pred_count + 1)  # row/column 0: background
    intersection = pairs[1:, 1:]
    true_area, pred_area = pairs[1:].sum(1), pairs[:, 1:].sum(0)
    union = true_area[:, None] + pred_area[None, :] - intersection
    return intersection, union, true_area, pred_area


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) of a predicted label image against the truth.

    Each true nucleus is paired with the overlapping prediction of highest IoU (on a tie, the one
    with the lowest id); C sums the intersections and U the unions of the pairs, a true nucleus
    that no prediction overlaps adds its area to U alone, and so does every prediction paired with
    no nucleus. AJI = C / U. A prediction paired with several nuclei counts in each of their
    unions, so merges cost more than in pixel IoU. Both images empty: 1.0 (nothing to find,
    nothing found); one empty: 0.0.
    """
    intersection, union, true_area, pred_area = _overlaps(true, pred)
    if not true_area.size and not pred_area.size:
        return 1.0
    if not true_area.size or not pred_area.size:
        return 0.0
    nuclei = np.arange(true_area.size)
    best = (intersection / union).argmax(1)  # the first maximum: lowest id on a tie
    best_intersection = intersection[nuclei, best]  # 0 where no prediction overlaps
    paired = best_intersection > 0
    best_union = np.where(paired, union[nuclei, best], true_area)
    used = np.zeros(pred_area.size, dtype=bool)
    used[best[paired]] = True
    return float(best_intersection.sum() / (best_union.sum() + pred_area[~used].sum()))


def panoptic_quality(true: np.ndarray, pred: np.ndarray) -> dict:
    """Panoptic quality (Kirillov et al. 2019) of a predicted label image against the truth.

    A true and a predicted nucleus match when their IoU is > 0.5 (exactly 0.5 is no match); each
    nucleus can then match at most one other, so no assignment is needed. TP counts the matches,
    FP the unmatched predictions and FN the unmatched true nuclei. Returns a dict with
    "dq" = TP / (TP + FP/2 + FN/2), "sq" = the mean IoU of the matches (0.0 without any), "pq" =
    dq * sq, and the counts "tp", "fp", "fn". Both images empty: pq = dq = sq = 1.0 with zero
    counts (nothing to find, nothing found).
    """
    intersection, union, true_area, pred_area = _overlaps(true, pred)
    if not true_area.size and not pred_area.size:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    matched = 2 * intersection > union  # IoU > 0.5 in integers, so 0.5 itself is exact
    tp = int(matched.sum())
    fp, fn = pred_area.size - tp, true_area.size - tp
    dq = tp / (tp + fp / 2 + fn / 2)
    sq = float((intersection[matched] / union[matched]).mean()) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


class InstanceMetrics:
    """Mean over images of AJI, PQ, DQ and SQ; update(true, pred) takes one pair of label images.

    Per-image means, as in Mahbod et al. (2022): every image weighs the same, however many nuclei
    it holds. compute() returns "aji", "pq", "dq", "sq" and the number of "images".
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sums = {"aji": 0.0, "pq": 0.0, "dq": 0.0, "sq": 0.0}
        self._images = 0

    def update(self, true: np.ndarray, pred: np.ndarray) -> None:
        quality = panoptic_quality(true, pred)
        self._sums["aji"] += aji(true, pred)
        for key in ("pq", "dq", "sq"):
            self._sums[key] += quality[key]
        self._images += 1

    def compute(self) -> dict:
        if self._images == 0:
            raise ValueError("compute() called before any update(): no images to score")
        return {**{key: total / self._images for key, total in self._sums.items()},
                "images": self._images}
