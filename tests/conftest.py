"""Under pytest-xdist (`make test` runs a worker per core) each worker computes on one thread:
torch's default, a thread per core in every worker, oversubscribes the cores, and OpenMP's
spinning threads then slow the suite several-fold. Tests that need more threads set them."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
