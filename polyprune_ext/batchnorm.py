"""BatchNorm statistics re-estimated after pruning.

Removing channels changes what every later layer receives, so the running means and variances a
BatchNorm learned no longer match its inputs: a pruned model judged, scored or fine-tuned with
those stale statistics looks far worse than it is (on Kvasir-SEG, one prune to -50% FLOPs kept
Dice 0.076 of 0.598 with stale statistics and 0.558 after re-estimating them). recalibrate_bn
resets them and re-estimates them from a few hundred training images.

Each BatchNorm's statistics are the exact pooled mean and unbiased variance of its inputs over
all the images, combined batch by batch in float64 (Chan et al.'s parallel formula), not the
average of per-batch variances that ``momentum=None`` gives, which misses the spread between
batch means. During the pass the BatchNorms run in training mode (normalising with the batch's
own statistics, as when they were trained) and every other module in eval mode (no dropout, as
at inference). Under torch.distributed the statistics are combined over every rank's images, so
all ranks end with the same buffers.
"""

import warnings
from typing import Iterable, Optional

import torch

from ._inputs import device_of, split_batch

Norm = torch.nn.modules.batchnorm._BatchNorm


class _Moments:
    """Count, mean and sum of squared deviations per channel, in float64, merged exactly."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def add_batch(self, x: torch.Tensor) -> None:
        """The inputs of one call: (N, C, *spatial), channels in dim 1."""
        values = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        mean = values.mean(1)
        self.add(values.shape[1], mean, (values - mean[:, None]).square().sum(1))


def recalibrate_bn(model: torch.nn.Module, loader: Iterable, num_images: Optional[int] = None) -> int:
    """Replace the running statistics of every BatchNorm (1-, 2-, 3-D, SyncBatchNorm) that keeps
    them with new estimates over the first ``num_images`` images of ``loader`` (all of
    them when None): batches as ``score`` takes them ((images, targets) pairs, dicts with
    "image", or image tensors). Returns the number of BatchNorms re-estimated; a model without
    any is left alone, with a warning. Every submodule's mode, each norm's momentum and every
    other tensor are left as they were (all of them, the statistics too, if the pass fails); no
    autograd, no ``.grad`` written."""
    norms = [m for m in model.modules() if isinstance(m, Norm) and m.track_running_stats]
    if not norms:
        warnings.warn("the model has no BatchNorm with running statistics: nothing to re-calibrate",
                      stacklevel=2)
        return 0
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be at least 1 (or None for the whole loader), got {num_images}")
    moments = {m: _Moments() for m in norms}
    saved = {m: (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms}
    handles = [m.register_forward_pre_hook(lambda m, args: moments[m].add_batch(args[0]))
               for m in norms]
    modes = {m: m.training for m in model.modules()}
    device, seen, batches = device_of(model), 0, 0
    try:
        model.eval()
        for m in norms:  # batch statistics normalise, the running ones stay untouched meanwhile
            m.train()
            m.momentum = 0.0
        with torch.no_grad():
            for batch in loader:
                x = split_batch(batch, needs_target=False)[0]
                if num_images is not None:
                    x = x[:num_images - seen]
                model(x.to(device))
                seen, batches = seen + len(x), batches + 1
                if num_images is not None and seen >= num_images:
                    break
        if seen == 0:
            raise ValueError("the loader yielded no images to re-calibrate BatchNorm statistics with")
        estimates = {m: _all_ranks(moments[m]) for m in norms}
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
        for norm, (momentum, tracked) in saved.items():
            norm.momentum = momentum
            if norm.num_batches_tracked is not None and tracked is not None:
                norm.num_batches_tracked.copy_(tracked)
    for m in norms:
        _set_statistics(m, estimates[m], batches)
    return len(norms)


def _all_ranks(moments: _Moments) -> _Moments:
    """The moments over every rank's images under torch.distributed, merged in rank order (the
    same bits on every rank); the moments as they are otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return moments
    assert moments.mean is not None and moments.m2 is not None
    mine = torch.cat([torch.tensor([float(moments.count)], dtype=torch.float64), moments.mean.cpu(),
                      moments.m2.cpu()])
    if torch.distributed.get_backend() == "nccl":
        mine = mine.cuda()
    everyone = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, mine)
    merged, channels = _Moments(), len(moments.mean)
    for row in everyone:
        row = row.cpu()
        merged.add(int(row[0]), row[1:1 + channels], row[1 + channels:])
    return merged


def _set_statistics(norm: Norm, moments: _Moments, batches: int) -> None:
    """The estimates as the running statistics, counted as ``batches`` batches (the weight a
    later cumulative average, momentum None, gives them)."""
    assert moments.mean is not None and moments.m2 is not None
    assert norm.running_mean is not None and norm.running_var is not None
    variance = moments.m2 / max(moments.count - 1, 1)  # unbiased, as BatchNorm keeps it
    norm.running_mean.copy_(moments.mean.to(norm.running_mean))
    norm.running_var.copy_(variance.to(norm.running_var))
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.fill_(batches)

