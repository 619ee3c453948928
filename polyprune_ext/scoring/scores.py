"""What every criterion returns, and the weighting applied to its scores before ranking."""

import dataclasses

import torch

from ..structure.analysis import Analysis
from ..structure.policy import cost


@dataclasses.dataclass
class Scores:
    """One score per channel of every prunable group; higher = more important."""

    values: dict[int, torch.Tensor]  # group index -> per-channel score (float64, CPU)
    analysis: Analysis  # the analysis the group indices refer to
    batches: int = 0  # batches scored (TaylorFO)
    skipped_batches: int = 0  # with NaN or Inf (nonfinite="skip")
    skipped_samples: int = 0  # whose output gradient was zero


def weigh_scores(values: dict[int, torch.Tensor], analysis: Analysis, normalize_layers: bool,
                 flops_weighted: bool) -> dict[int, torch.Tensor]:
    """``values`` (in place) divided by each group's L2 norm, then by one channel's FLOPs; shared
    by every criterion and the Pruner. Normalisation comes first: the FLOPs divisor is one number
    per group, which normalising afterwards would cancel."""
    if normalize_layers:
        for i, v in values.items():
            norm = v[torch.isfinite(v)].norm()
            values[i] = v / norm if norm > 0 else v
    if flops_weighted:
        full = cost(analysis)["flops"]
        for i in values:
            per_channel = full - cost(analysis, {i: analysis.groups[i].size - 1})["flops"]
            values[i] = values[i] / max(per_channel, 1)
    return values

