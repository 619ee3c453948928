"""polyprune_ext: prune segmentation networks for real-time use, with fused C++/CUDA kernels.

The library (this namespace) works on any PyTorch model and needs torch alone:

- ``ops``: the kernels, as torch ops (fused activation x gradient reduction, in-place compaction);
- structural pruning: ``analyze`` (channel groups, op ``rule``s), ``select_channels`` and
  ``cost`` (what to remove), ``PruningPlan`` (removes channels and records it), ``save`` and
  ``load`` (plain weights plus the plan), ``model_stats`` (params and FLOPs);
- scoring: ``score`` (TaylorFO), ``baseline_scores`` (L1, L2, BN scale, random) and ``Pruner``
  (TaylorFO inside training steps);
- unstructured pruning: ``magnitude_prune_`` and compressed sparse checkpoints;
- ``latency``: how fast a model runs, measured the way it will be run;
- ``export_onnx``: an ONNX file checked in onnxruntime on the spot, ``onnx_latency`` timing it
  there (the ``deploy`` extra).

The applications built on it (a training engine, the polyp and nuclei tasks, the ``polyprune``
command) live in ``polyprune_ext.engine``, ``polyprune_ext.tasks`` and ``polyprune_ext.cli``.
"""

import torch

from . import _C  # type: ignore[attr-defined]  # the compiled kernels: torch.ops.polyprune_ext
from . import ops
from .batchnorm import recalibrate_bn
from .choices import Baseline, Criterion, Dtype, Grad, Provider, Reduce, Scope, Target
from .export import OnnxExport, export_onnx, onnx_latency
from .models import register_model_family
from .scoring import Pruner, Scores, baseline_scores, score
from .speed import latency
from .structure import (Analysis, ChannelGroup, Gate, LatencyModel, ModelStats, PruningPlan, analyze,
                        cost, latency_model, load, model_stats, rule, save, select_channels,
                        zero_channels)
from .unstructured import load_compressed, magnitude_prune_, make_permanent_, save_compressed

__all__ = [
    "Analysis", "Baseline", "ChannelGroup", "Criterion", "Dtype", "Gate", "Grad", "LatencyModel",
    "ModelStats", "OnnxExport", "Provider", "Pruner", "PruningPlan", "Reduce", "Scope", "Scores",
    "Target", "analyze", "baseline_scores", "build_info", "cost", "export_onnx", "latency",
    "latency_model", "load", "load_compressed", "magnitude_prune_", "make_permanent_",
    "model_stats", "onnx_latency", "ops", "recalibrate_bn", "register_model_family", "rule", "save",
    "save_compressed", "score", "select_channels", "zero_channels",
]


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
