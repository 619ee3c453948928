"""The library's vocabulary: every option that takes one of a few names, as a Literal type.

The API, PruneConfig, the polyprune command and the benchmarks take these names and no others,
so a choice is spelled the same everywhere (``--criterion l1`` is ``criterion="l1"``).
"""

from typing import Any, Literal, get_args

# How a channel's importance is measured: TaylorFO (activation x gradient, polyprune_ext.score)
# or a data-free baseline (polyprune_ext.baseline_scores).
Criterion = Literal["taylor", "l1", "l2", "bn_scale", "random"]
Baseline = Literal["l1", "l2", "bn_scale", "random"]
# Which gradient TaylorFO back-propagates: each sample's output gradient at unit norm
# (Sapkota et al. 2023), the plain loss gradient, or a random unit-norm one (no labels).
Grad = Literal["normalized", "loss", "random"]
# How per-sample scores z[n, c] become one score per channel: |sum_n z|, sum_n |z|, sum_n z^2.
Reduce = Literal["abs_sum", "sum_abs", "sum_sq"]
# What a pruning amount is a fraction of (latency: as a latency model of the device predicts it).
Target = Literal["channels", "params", "flops", "latency"]
# One ranking over the whole network, or the same fraction from every layer (group).
Scope = Literal["global", "layer"]
# The fused kernel, or the eager PyTorch reference (for checks and benchmarks).
Backend = Literal["fused", "torch"]
# A batch with NaN or Inf in its scores: an error, or skipped and counted.
NonFinite = Literal["raise", "skip"]
# The number format a model runs in (latency rows, inference, ONNX export), as torch names it.
Dtype = Literal["float32", "float16", "bfloat16"]
# Where onnxruntime runs an exported model: its CPU or its CUDA execution provider.
Provider = Literal["cpu", "cuda"]
# Norms whose statistics mix channels (layer norm over channels, group norm inside a group,
# GRN): their channels frozen, or pruned, the statistics then running over the channels kept
# (not function-preserving).
MixingNorms = Literal["freeze", "prune"]


def names(choice: Any) -> tuple[str, ...]:
    """The names a Literal type allows, in order."""
    return get_args(choice)


def check(option: str, value: Any, choice: Any) -> None:
    """ValueError naming ``option`` and the allowed names unless ``value`` is one of them."""
    if value not in names(choice):
        raise ValueError(f"{option} must be one of {names(choice)}, got {value!r}")
