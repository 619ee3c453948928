"""Pure-PyTorch versions of the ops in polyprune_ext.ops: the tests' oracle, the benchmarks' baseline.

They compute the same quantities with ordinary eager ops (materialising ``act * grad`` and, for
compaction, a new tensor), in any dtype, float64 included.
"""

from typing import Optional, Sequence, Union

import torch

from . import accumulation_dtype


def taylor_reduce(
    act: torch.Tensor,
    grad: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    *,
    reduce: str = "sum",
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Same result as polyprune_ext.ops.taylor_reduce, computed in ``dtype`` (default: float64 for
    float64 inputs, else float32)."""
    if dtype is None:
        dtype = accumulation_dtype(act.dtype)
    z = act.to(dtype) * grad.to(dtype)
    if z.dim() > 2:
        z = z.flatten(2).sum(-1)
    if scale is not None:
        z = z * scale.to(dtype)[:, None]
    if reduce == "per_sample":
        return z
    if reduce == "sum":
        return z.sum(0)
    if reduce == "sum_abs":
        return z.abs().sum(0)
    if reduce == "sum_sq":
        return z.square().sum(0)
    raise ValueError(f"unknown reduce {reduce!r}")


def compact(tensor: torch.Tensor, keep: Union[torch.Tensor, Sequence[int]], dim: int) -> torch.Tensor:
    """The kept slices as a new tensor: what polyprune_ext.ops.compact_ leaves in place."""
    return tensor.index_select(dim, torch.as_tensor(keep, dtype=torch.int64, device=tensor.device))
