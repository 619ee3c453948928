import pytest
import torch

from polyprune_ext.data import MEAN, STD

# CUDA cases run whenever a GPU is visible, and are skipped only when none is.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def unnormalize(x):
    """A data set's image tensor back to [0, 1] colours."""
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def dihedral(t):
    """The 8 flips/rotations of a tensor over its last two dimensions."""
    out = []
    for flipped in (t, t.flip(-1)):
        out += [flipped.rot90(k, (-2, -1)) for k in range(4)]
    return out
