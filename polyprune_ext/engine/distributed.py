"""Training, pruning and fine-tuning on several processes: one per GPU, on one node or many,
started by torchrun.

torchrun gives each process its RANK, LOCAL_RANK and WORLD_SIZE; ``process_group`` joins them
(NCCL on GPUs, gloo on CPUs) and puts each on its own GPU. The Trainer then trains through
DistributedDataParallel: each process reads its share of every global batch (a
DistributedSampler whose shuffle is the same on every process, and the same as one process's),
gradients are averaged, so N processes step as one process over the whole batch would. TaylorFO
scores are summed over the processes before every prune (scoring.taylor), so each removes the
same channels; the DDP wrapper is built again for every fit, since its gradient buckets hold the
shapes a prune changes, and the optimizer, whose state the prune compacted, carries on. Rank 0
alone writes checkpoints and logs. Outside torchrun every function here is the one-process case.
"""

import contextlib
import os
from typing import Iterator, Sized

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the process that writes checkpoints, logs and reports, and prints."""
    return rank() == 0


@contextlib.contextmanager
def process_group(device: str) -> Iterator[str]:
    """Under torchrun, joins the default process group (NCCL when ``device`` is CUDA, else gloo)
    for the duration, and yields this process's device (cuda:LOCAL_RANK for any CUDA device);
    otherwise yields ``device`` as it is."""
    if not launched():
        yield device
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def local_batch_size(batch_size: int) -> int:
    """This process's share of a global batch of ``batch_size``."""
    if batch_size % world_size():
        raise ValueError(f"the batch size {batch_size} is the global batch, split over "
                         f"{world_size()} processes: make it a multiple of {world_size()}")
    return batch_size // world_size()


def sampler(dataset: Sized, seed: int) -> torch.utils.data.DistributedSampler:
    """Shuffles ``dataset`` by ``seed`` and the epoch (``set_epoch``) and hands this process
    every world_size-th index: in step k the processes together read items k*B to (k+1)*B - 1
    of the epoch's permutation (B the global batch), which is what one process reads."""
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(),  # type: ignore[arg-type]
                                               shuffle=True, seed=seed, drop_last=True)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several processes run, else ``model``. A static
    graph: the parameters the forward pass uses are the same every step, so modules it never
    calls (smp PSPNet's unused encoder stages) need no search for unused parameters."""
    if not active():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over the processes (the values themselves in one process)."""
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every process. DDP sends them before
    each forward pass, but each process updates its own in that pass: after an epoch they
    differ, and evaluation, scoring and the checkpoint should all see the same model."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
