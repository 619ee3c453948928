"""polyprune_ext: prune segmentation networks for real-time use, with fused C++/CUDA kernels."""

import torch

from . import _C  # loads the compiled kernels and registers torch.ops.polyprune_ext
from . import ops
from .dependency import analyze
from .pruner import Pruner
from .scoring import score

__all__ = ["Pruner", "analyze", "build_info", "ops", "score"]


def build_info() -> dict:
    """Which kernels this installation compiled in, and what this process can run.

    Keys: ``cpu`` (always True), ``cuda`` (CUDA kernels compiled in), ``cuda_version`` (of the nvcc
    that built them), ``cuda_archs`` (the ``__CUDA_ARCH_LIST__`` they were compiled for, e.g.
    ``"800,860,900"``), ``torch`` (the running torch) and ``cuda_available`` (a GPU is usable now).
    """
    info = dict(_C.build_info())
    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info
