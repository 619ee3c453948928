import pytest
import torch

# CUDA cases run whenever a GPU is visible, and are skipped only when none is.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
