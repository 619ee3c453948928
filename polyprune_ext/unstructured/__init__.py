"""Unstructured pruning: the smallest weights zeroed, layer-wise or network-wide (magnitude), and
checkpoints that store those zeros in one bit each (sparse_checkpoint). Zeros make a model
smaller on disk, not faster on dense hardware: for speed, prune structurally."""

from .magnitude import (hold_zeros_, magnitude_prune_, make_permanent_, permanent_state_dict,
                        prunable_tensors, sparsity_for, sparsity_of)
from .sparse_checkpoint import load_compressed, save_compressed

__all__ = ["hold_zeros_", "load_compressed", "magnitude_prune_", "make_permanent_",
           "permanent_state_dict", "prunable_tensors", "save_compressed", "sparsity_for",
           "sparsity_of"]
