"""The two kernels of polyprune_ext as torch ops: the fused Taylor reduction and in-place compaction.

The C++ kernels (csrc/) check every input and raise ValueError / TypeError / IndexError naming the
bad value; these wrappers only turn Python-level arguments into the ops' tensors. Fake kernels are
registered here so both ops trace under torch.compile. Pure-PyTorch equivalents, the tests' oracle
and the benchmarks' baseline, are in polyprune_ext.reference.
"""

from typing import Optional, Sequence, Union

import torch

REDUCE_OPTIONS = ("per_sample", "sum", "sum_abs", "sum_sq")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype taylor_reduce accumulates and returns in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def taylor_reduce(
    act: torch.Tensor,
    grad: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    *,
    reduce: str = "sum",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """First-order Taylor contribution of every channel, in one pass over ``act`` and ``grad``.

    ``z[n, c] = scale[n] * sum_spatial(act[n, c] * grad[n, c])`` for ``act`` and ``grad`` of shape
    (N, C, *spatial) with 0 to 3 spatial dims, then, by ``reduce``:

    - ``"per_sample"``: ``z`` itself, shape (N, C);
    - ``"sum"``: ``sum_n z``, shape (C,). The TaylorFO score ``|sum_n z|`` is ``abs()`` of an
      accumulated ``"sum"``, so that accumulating over many batches stays exact;
    - ``"sum_abs"``: ``sum_n |z|``; ``"sum_sq"``: ``sum_n z**2``.

    ``scale`` (N,) is the per-sample factor of gradient-normalised scoring (``1 / ||dL/dy_n||``).
    With ``out`` given, the result is added to it in place (``out += ...``), so a running score
    over batches allocates nothing; it must be contiguous, of the result's shape, and float32
    (float64 for float64 inputs). Otherwise a new zero-initialised ``out`` is returned.

    Sums accumulate in float32 for float32, float16 and bfloat16 inputs (float64 for float64).
    Contiguous (NCHW) and channels_last inputs, and one of each, are read in place; layouts whose
    spatial dims do not form one strided run are first copied to contiguous. There are no
    floating-point atomics: the same inputs give the same bits on the same device (CPU) or GPU
    model. (The CPU kernel picks an AVX2/FMA or a baseline code path when the library loads, so
    two different x86 CPUs may differ in the last bits; the CUDA kernels' summation order depends
    on the GPU's multiprocessor count.) Not differentiable: call it on activations and gradients,
    e.g. inside backward hooks.

    ``out`` must not share memory with ``act`` or ``grad`` (ValueError). A ``scale`` that shares
    memory with ``out`` is copied first: it is read as it was before the call.
    """
    if not isinstance(act, torch.Tensor) or act.dim() < 2:
        raise ValueError(
            "taylor_reduce: act must be a tensor of shape (N, C, *spatial), got "
            f"{tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__}"
        )
    if out is None:
        shape = tuple(act.shape[:2]) if reduce == "per_sample" else (act.shape[1],)
        out = act.new_zeros(shape, dtype=accumulation_dtype(act.dtype))
    torch.ops.polyprune_ext.taylor_reduce_accumulate_(out, act, grad, scale, reduce)
    return out


def compact_(
    tensor: torch.Tensor, keep: Union[torch.Tensor, Sequence[int]], dim: int
) -> torch.Tensor:
    """Keep only the slices ``keep`` of ``dim``, in place, and return ``tensor`` itself.

    ``keep`` holds sorted, unique, in-range indices (a sequence or an integer tensor on any
    device). The kept slices are moved to the front of the tensor's own storage and ``tensor`` is
    re-pointed (``Tensor.set_``) at them with its new shape, so every reference to this tensor
    object, whether a module's parameter or buffer, a ``.grad`` or an optimizer's state, sees
    the compacted tensor. No tensor-sized buffer is allocated: the CPU kernel moves slices in
    place; the CUDA kernel moves up to 256 KiB through one block's shared memory, and more through
    a scratch buffer of at most 1/8 of the tensor (at least one element), in batches. Nothing
    moves when ``keep`` is a prefix. The tensor must be dense; its memory layout is kept (a
    contiguous tensor stays contiguous, a channels_last one stays channels_last). The storage
    keeps its capacity until the tensor is cloned or freed. A ``keep`` tensor that shares memory
    with ``tensor`` is copied first. Equivalent to ``tensor.index_select(dim, keep)``.
    """
    if isinstance(keep, torch.Tensor):
        if keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
            raise TypeError(f"compact_: keep must hold integer indices, got dtype {keep.dtype}")
        keep = keep.detach().to("cpu", torch.int64).contiguous()
    else:
        keep = torch.tensor(list(keep), dtype=torch.int64)
    with torch.no_grad():
        torch.ops.polyprune_ext.compact_(tensor, keep, dim)
        size = list(tensor.shape)
        inner = tensor.stride(dim)
        # In memory order, dims outside `dim` shrink their strides by the kept fraction.
        stride = [s if s <= inner or size[d] == 1 else s // size[dim] * len(keep)
                  for d, s in enumerate(tensor.stride())]
        size[dim] = len(keep)
        tensor.set_(tensor.untyped_storage(), tensor.storage_offset(), size, stride)
    return tensor


def compact_parameter_(
    param: torch.nn.Parameter,
    keep: Union[torch.Tensor, Sequence[int]],
    dim: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> torch.nn.Parameter:
    """Compact a parameter, its ``.grad`` and, given ``optimizer``, that optimizer's state for it
    (SGD momentum, Adam/AdamW exp_avg and exp_avg_sq, ...: every state tensor of the parameter's
    shape), all in place. The Parameter object, which optimizers and modules hold references to,
    stays the same, so the same optimizer goes on training the smaller parameter."""
    shape = param.shape
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    for t in [param, param.grad, *state.values()]:
        if isinstance(t, torch.Tensor) and t.shape == shape:
            compact_(t, keep, dim)
    return param


@torch.library.register_fake("polyprune_ext::taylor_reduce_accumulate_")
def _taylor_reduce_accumulate_fake(out: torch.Tensor, act: torch.Tensor, grad: torch.Tensor,
                                   scale: Optional[torch.Tensor], reduce: str) -> None:
    return None


@torch.library.register_fake("polyprune_ext::compact_")
def _compact_fake(tensor: torch.Tensor, keep: torch.Tensor, dim: int) -> None:
    return None
