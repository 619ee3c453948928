"""Checkpoints that store the zeros of magnitude-pruned weights in one bit each.

Unstructured magnitude pruning (polyprune_ext.unstructured.magnitude) leaves most convolution weights exactly
zero (98% at compression ratio 64) but no faster on a dense GPU: its benefit is the size on disk,
which is what the compression ratios of Mahbod et al. (2022) stand for. A plain state_dict stores
every zero in full; this format stores the non-zeros and a bit mask of where they go.

Format: one safetensors file. A floating-point tensor stored sparse (one with zeros, where that
makes the file smaller) becomes ``name::values`` (its non-zero values, 1-D, same dtype) and
``name::mask`` (uint8: numpy.packbits of its flattened ``!= 0`` mask, zero padding bits); every
other tensor (dense floats, integer buffers such as num_batches_tracked) keeps its own name and
contents. The metadata key ``polyprune-sparse`` holds the JSON ``{"format": "polyprune-sparse/1",
"shapes": {name: shape}}`` of the sparse tensors. State_dict keys cannot contain ``::``.

Non-zero values, NaNs included, come back bit-identical; -0.0 counts as a zero and comes back
+0.0. Loading reads tensors and JSON only: it never unpickles, so opening a checkpoint cannot run
code from it.
"""

import json
import math
from pathlib import Path
from typing import Mapping, Union

import torch

from .. import _io

FORMAT = "polyprune-sparse/1"
METADATA_KEY = "polyprune-sparse"
SEPARATOR = "::"


def save_compressed(state_dict: Union[Mapping[str, torch.Tensor], torch.nn.Module],
                    path: Union[str, Path], *, min_sparsity: float = 0.0) -> dict[str, float]:
    """Write ``state_dict`` (or a model's) to ``path`` in the sparse format, each floating-point
    tensor whose fraction of zeros is above ``min_sparsity`` stored sparse where that is smaller.
    The file is written to a temporary name in the same folder and renamed, so a crash or an
    error leaves no half-written file.

    Returns the sizes to report: ``dense_bytes`` (a plain safetensors file of the same
    state_dict), ``compressed_bytes`` (this file), ``ratio`` (compressed / dense: below 1 is a
    saving) and ``sparsity`` (the fraction of zeros over the tensors stored sparse, 0 if none)."""
    if isinstance(state_dict, torch.nn.Module):
        state_dict = state_dict.state_dict()
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    if any(SEPARATOR in name for name in state):
        raise ValueError(f"state_dict keys must not contain {SEPARATOR!r}, which names the parts "
                         f"of sparse tensors: {[name for name in state if SEPARATOR in name]}")
    stored, shapes, zeros, elements = {}, {}, 0, 0
    for name, tensor in state.items():
        nonzero = tensor.reshape(-1) != 0
        count = int(nonzero.sum())
        sparse_bytes = count * tensor.element_size() + (tensor.numel() + 7) // 8
        if (tensor.is_floating_point() and tensor.numel() > 0 and sparse_bytes < tensor.nbytes
                and 1 - count / tensor.numel() > min_sparsity):
            stored[name + SEPARATOR + "values"] = tensor.reshape(-1)[nonzero]
            stored[name + SEPARATOR + "mask"] = pack_bits(nonzero)
            shapes[name] = list(tensor.shape)
            zeros, elements = zeros + tensor.numel() - count, elements + tensor.numel()
        else:
            stored[name] = tensor
    path = Path(path)
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT, "shapes": shapes})}
    from safetensors.torch import save, save_file

    _io.replace_atomically(path, lambda tmp: save_file(stored, str(tmp), metadata=metadata))
    dense_bytes = len(save(state))
    compressed_bytes = path.stat().st_size
    return {"dense_bytes": dense_bytes, "compressed_bytes": compressed_bytes,
            "ratio": compressed_bytes / dense_bytes, "sparsity": zeros / elements if elements else 0.0}


def load_compressed(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The dense state_dict (on the CPU) saved by save_compressed at ``path``. Refuses, with a
    ValueError naming the file, one that save_compressed did not write or that is corrupted."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as file:
            metadata = file.metadata() or {}
            stored = {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} was not written by save_compressed: it has no {METADATA_KEY!r} "
                         f"metadata (a plain safetensors file opens with safetensors.torch.load_file)")
    try:
        record = json.loads(metadata[METADATA_KEY])
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{path} has unreadable {METADATA_KEY!r} metadata")
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} is in format {record.get('format')!r}; this version reads {FORMAT!r}")
    if not isinstance(record.get("shapes"), dict):
        raise ValueError(f"{path} is corrupted: its metadata lists no shapes")
    state = {}
    for name, shape in record["shapes"].items():
        values = stored.pop(name + SEPARATOR + "values", None)
        mask = stored.pop(name + SEPARATOR + "mask", None)
        state[name] = dense_tensor(values, mask, shape, f"{path}: sparse tensor {name!r}")
    leftover = [name for name in stored if SEPARATOR in name]
    if leftover:
        raise ValueError(f"{path} is corrupted: tensors {leftover} belong to no sparse tensor")
    return {**stored, **state}


def dense_tensor(values: torch.Tensor, mask: torch.Tensor, shape: list[int], where: str) -> torch.Tensor:
    """The tensor of ``shape`` with ``values`` where the packed ``mask`` bits are set, after
    checking that the parts fit together (``where`` names the tensor in errors)."""
    if values is None or mask is None:
        raise ValueError(f"{where} lacks its values or its mask")
    if not (isinstance(shape, list) and all(isinstance(size, int) and size >= 0 for size in shape)):
        raise ValueError(f"{where} has an invalid shape {shape!r}")
    numel = math.prod(shape)
    if mask.dtype != torch.uint8 or mask.shape != ((numel + 7) // 8,):
        raise ValueError(f"{where}: its mask of {mask.dtype} {list(mask.shape)} does not fit its "
                         f"shape {shape}")
    bits = unpack_bits(mask)
    if bits[numel:].any():
        raise ValueError(f"{where}: its mask has padding bits set")
    nonzero = bits[:numel]
    if values.dim() != 1 or values.numel() != int(nonzero.sum()):
        raise ValueError(f"{where}: {values.numel()} values for {int(nonzero.sum())} set mask bits")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[nonzero] = values
    return dense.reshape(shape)


_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Booleans packed 8 to a byte, the first in the highest bit, the last byte padded with zeros
    (numpy.packbits' layout)."""
    padded = torch.zeros((flags.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[:flags.numel()] = flags.reshape(-1)
    return (padded.view(-1, 8) * _BIT_VALUES).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """The booleans of pack_bits, padding included (8 per byte)."""
    return (packed.reshape(-1, 1) & _BIT_VALUES).ne(0).reshape(-1)
