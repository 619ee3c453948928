"""Binary segmentation metrics and the Dice + BCE training loss.

Pruning is only worth it if accuracy survives, so these numbers decide whether a pruned model is
kept. They are built to be exact and cheap:
  - only per-image pixel counts (TP, FP, FN) leave the device, so evaluation on a GPU does not copy
    whole masks to the CPU;
  - sums are kept in float64 / int64 on the CPU, so a long validation set does not lose precision
    or overflow.

Two kinds of average are reported, because papers use both:
  - per image ("dice", "iou"): the score of each image, then the mean over images. Every image
    weighs the same, so a small polyp missed entirely counts as much as a large one.
  - dataset level ("dice_dataset", "iou_dataset", "precision", "recall"): TP, FP and FN pooled over
    all pixels of all images, then one score. Large objects dominate.

Conventions for empty masks (no foreground in prediction nor target):
  - per image, such an image scores 1.0 for Dice and IoU: nothing to find, nothing found, which is
    right. (Frames without a polyp are common in colonoscopy video.)
  - pooled Dice/IoU likewise give 1.0 when TP + FP + FN == 0.
  - pooled precision TP/(TP+FP) with no predicted foreground, or recall TP/(TP+FN) with no true
    foreground, is 1.0 if TP + FP + FN == 0 (everything is empty: a perfect result) and else 0.0
    (e.g. predicting nothing while foreground exists gives precision 0.0, not an undefined value).
"""

import torch
import torch.nn.functional as F


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(
            f"logits and target must have the same shape, got logits {tuple(logits.shape)} "
            f"and target {tuple(target.shape)}"
        )
    if logits.dim() < 2:
        raise ValueError(f"expected (N, 1, H, W) tensors, got shape {tuple(logits.shape)}")


def _ratio(num: torch.Tensor, den: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else the value of `empty` (1.0 or 0.0) - never NaN.

    den holds pixel counts, so den > 0 means den >= 1 and the clamp changes nothing there; it only
    keeps the unused branch of torch.where free of 0/0.
    """
    return torch.where(den > 0, num / den.clamp(min=1), empty)


class BinarySegmentationMetrics:
    """Accumulates Dice, IoU, precision and recall over batches; see the module docstring.

    update(logits, target) takes raw network outputs (N, 1, H, W): sigmoid is applied here and a
    pixel is foreground when its probability is > threshold. target has the same shape with values
    in {0, 1} (float, int or bool; any nonzero value counts as foreground).
    """

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        self._dice_sum = torch.zeros((), dtype=torch.float64)
        self._iou_sum = torch.zeros((), dtype=torch.float64)
        self._tp = torch.zeros((), dtype=torch.int64)
        self._fp = torch.zeros((), dtype=torch.int64)
        self._fn = torch.zeros((), dtype=torch.int64)
        self._images = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        _check_shapes(logits, target)
        # float32 at least: sigmoid in float16 rounds probabilities near the threshold.
        pred = (torch.sigmoid(logits.float()) > self.threshold).flatten(1)
        true = (target != 0).flatten(1)
        # Per-image counts on the device, then only these N x 3 integers move to the CPU.
        counts = torch.stack(
            [(pred & true).sum(1), (pred & ~true).sum(1), (~pred & true).sum(1)]
        ).to("cpu", torch.int64)
        tp, fp, fn = counts.double()
        one = torch.ones((), dtype=torch.float64)
        self._dice_sum += _ratio(2 * tp, 2 * tp + fp + fn, one).sum()
        self._iou_sum += _ratio(tp, tp + fp + fn, one).sum()
        self._tp += counts[0].sum()
        self._fp += counts[1].sum()
        self._fn += counts[2].sum()
        self._images += pred.shape[0]

    def compute(self) -> dict:
        if self._images == 0:
            raise ValueError("compute() called before any update(): no images to score")
        tp, fp, fn = self._tp.double(), self._fp.double(), self._fn.double()
        one = torch.ones((), dtype=torch.float64)
        # Zero-denominator value for precision/recall: 1.0 only when everything is empty.
        empty = one if tp + fp + fn == 0 else torch.zeros((), dtype=torch.float64)
        return {
            "dice": (self._dice_sum / self._images).item(),
            "iou": (self._iou_sum / self._images).item(),
            "dice_dataset": _ratio(2 * tp, 2 * tp + fp + fn, one).item(),
            "iou_dataset": _ratio(tp, tp + fp + fn, one).item(),
            "precision": _ratio(tp, tp + fp, empty).item(),
            "recall": _ratio(tp, tp + fn, empty).item(),
            "images": self._images,
        }


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss: 1 - mean over images of (2 sum(p t) + eps) / (sum p + sum t + eps).

    p = sigmoid(logits), so the loss is differentiable. Per image then mean, matching how the
    per-image Dice metric is averaged. eps keeps empty images defined (an empty target with an
    empty prediction gives loss 0) and smooths the gradient on nearly empty ones. Computed in at
    least float32 so half-precision logits under autocast do not overflow the sums.
    """
    _check_shapes(logits, target)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    p = torch.sigmoid(logits.to(dtype)).flatten(1)
    t = target.to(dtype).flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return 1 - dice.mean()


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss: BCE-with-logits (mean over pixels) + dice_loss.

    BCE gives well-behaved per-pixel gradients early on; Dice counters the foreground/background
    imbalance of small polyps and nuclei.
    """
    _check_shapes(logits, target)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits.to(dtype), target.to(dtype))
    return bce + dice_loss(logits, target)
