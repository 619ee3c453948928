"""Segmentation metrics and losses against answers worked out by hand or in plain numpy."""

import numpy as np
import pytest
import torch

from polyprune_ext.tasks.metrics import BinarySegmentationMetrics, dice_bce_loss, dice_loss
from polyprune_ext.testing import devices


def logits_of(pred):
    """Large-margin logits giving exactly the mask `pred` at threshold 0.5."""
    pred = torch.as_tensor(pred, dtype=torch.float32)
    return (pred * 2 - 1) * 10


def masks(*rows_per_image):
    """(N, 1, H, W) float tensor from nested lists, one per image."""
    return torch.tensor(rows_per_image, dtype=torch.float32).unsqueeze(1)


def scores(pred, target, threshold=0.5):
    m = BinarySegmentationMetrics(threshold)
    m.update(logits_of(pred), target)
    return m.compute()


def test_hand_counted_4x4():
    target = masks([[1, 1, 1, 0],
                    [1, 1, 0, 0],
                    [0, 0, 0, 0],
                    [0, 0, 0, 0]])
    pred = masks([[1, 1, 0, 0],
                  [1, 0, 0, 0],
                  [1, 1, 0, 0],
                  [0, 0, 0, 0]])
    tp, fp, fn = 3, 2, 2
    s = scores(pred, target)
    assert s["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-15)  # 0.6
    assert s["iou"] == pytest.approx(tp / (tp + fp + fn), abs=1e-15)  # 3/7
    assert s["dice_dataset"] == s["dice"] and s["iou_dataset"] == s["iou"]
    assert s["precision"] == pytest.approx(tp / (tp + fp), abs=1e-15)
    assert s["recall"] == pytest.approx(tp / (tp + fn), abs=1e-15)
    assert s["images"] == 1


def test_per_image_and_dataset_differ():
    # Image 1: a large object found exactly (16 TP). Image 2: one object pixel, missed (1 FN).
    target = masks([[1] * 4] * 4, [[1, 0, 0, 0]] + [[0] * 4] * 3)
    pred = masks([[1] * 4] * 4, [[0] * 4] * 4)
    s = scores(pred, target)
    assert s["dice"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["iou"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["dice_dataset"] == pytest.approx(2 * 16 / (2 * 16 + 0 + 1))
    assert s["iou_dataset"] == pytest.approx(16 / 17)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(16 / 17)
    assert s["images"] == 2


def test_both_empty_conventions():
    empty = masks([[0] * 4] * 4)
    s = scores(empty, empty)
    assert s == {"dice": 1.0, "iou": 1.0, "dice_dataset": 1.0, "iou_dataset": 1.0,
                 "precision": 1.0, "recall": 1.0, "images": 1}

    # Nothing predicted while foreground exists: precision's denominator is 0 -> 0.0, not NaN.
    target = masks([[1, 0, 0, 0]] + [[0] * 4] * 3)
    s = scores(empty, target)
    assert s["precision"] == 0.0 and s["recall"] == 0.0 and s["dice"] == 0.0
    # Foreground predicted on an empty target: recall's denominator is 0 -> 0.0.
    s = scores(target, empty)
    assert s["recall"] == 0.0 and s["precision"] == 0.0

    # An empty frame scores 1.0 per image next to a half-found one.
    m = BinarySegmentationMetrics()
    m.update(logits_of(empty), empty)
    half_found = masks([[1, 0, 0, 0]] + [[0] * 4] * 3)
    m.update(logits_of(half_found), masks([[1, 1, 0, 0]] + [[0] * 4] * 3))
    s = m.compute()
    assert s["dice"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert s["dice_dataset"] == pytest.approx(2 / 3)


def test_threshold():
    logits = torch.tensor([-2.0, -0.1, 0.1, 1.0]).reshape(1, 1, 1, 4)  # sigmoid: .12 .48 .52 .73
    target = torch.tensor([0, 1, 1, 1]).reshape(1, 1, 1, 4)  # int targets are accepted
    for threshold, predicted in [(0.5, 2), (0.1, 4), (0.6, 1), (0.9, 0)]:
        m = BinarySegmentationMetrics(threshold)
        m.update(logits, target)
        s = m.compute()
        tp, fp = min(predicted, 3), max(predicted - 3, 0)
        assert s["recall"] == pytest.approx(tp / 3), threshold
        assert s["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0), threshold


@pytest.mark.parametrize("device", devices())
def test_random_masks_against_numpy(device):
    g = torch.Generator().manual_seed(0)
    m = BinarySegmentationMetrics(threshold=0.3)
    all_pred, all_true = [], []
    for batch in range(3):
        logits = torch.randn(4, 1, 17, 23, generator=g)
        target = torch.rand(4, 1, 17, 23, generator=g) > 0.6  # bool targets are accepted
        m.update(logits.to(device), target.to(device))
        all_pred.append(1 / (1 + np.exp(-logits.double().numpy())) > 0.3)
        all_true.append(target.numpy())
    pred = np.concatenate(all_pred).reshape(12, -1)
    true = np.concatenate(all_true).reshape(12, -1)
    tp = (pred & true).sum(1).astype(np.float64)
    fp = (pred & ~true).sum(1).astype(np.float64)
    fn = (~pred & true).sum(1).astype(np.float64)
    s = m.compute()
    assert s["images"] == 12
    assert s["dice"] == pytest.approx(np.mean(2 * tp / (2 * tp + fp + fn)), rel=1e-12)
    assert s["iou"] == pytest.approx(np.mean(tp / (tp + fp + fn)), rel=1e-12)
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    assert s["dice_dataset"] == pytest.approx(2 * TP / (2 * TP + FP + FN), rel=1e-12)
    assert s["iou_dataset"] == pytest.approx(TP / (TP + FP + FN), rel=1e-12)
    assert s["precision"] == pytest.approx(TP / (TP + FP), rel=1e-12)
    assert s["recall"] == pytest.approx(TP / (TP + FN), rel=1e-12)


def test_reset_and_empty_compute():
    m = BinarySegmentationMetrics()
    with pytest.raises(ValueError, match="update"):
        m.compute()
    one = masks([[1, 0], [0, 0]])
    m.update(logits_of(one), one)
    assert m.compute()["images"] == 1
    m.reset()
    with pytest.raises(ValueError):
        m.compute()


def test_shape_mismatch_names_both_shapes():
    m = BinarySegmentationMetrics()
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(2, 4, 4\)"):
        m.update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        dice_bce_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))


def test_loss_near_zero_for_perfect_logits():
    target = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    assert dice_bce_loss(logits_of(target) * 3, target).item() < 1e-6
    assert dice_bce_loss(-logits_of(target), target).item() > 1.0  # all wrong: large


def test_loss_gradient_and_float64_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 8, 8, generator=g, requires_grad=True)
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    loss = dice_bce_loss(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0

    x, t = logits.detach().double().numpy().reshape(3, -1), target.double().numpy().reshape(3, -1)
    p = 1 / (1 + np.exp(-x))
    bce = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    assert loss.item() == pytest.approx(bce + 1 - dice.mean(), rel=1e-5)
    assert dice_loss(logits.detach(), target).item() == pytest.approx(1 - dice.mean(), rel=1e-5)
    # float64 in, float64 out: the loss does not down-cast.
    assert dice_bce_loss(logits.detach().double(), target).dtype == torch.float64
