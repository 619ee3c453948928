"""Channel importance: first-order Taylor (TaylorFO) scores from the fused kernel, and baselines.

Removing a channel is zeroing it at every gate of its group (polyprune_ext.dependency), so the
first-order change of the network output when channel c goes is, per sample n,
``z[n, c] = sum over gates and positions of a * dy/da`` (a: the gate's activation). Forward hooks
on the gate modules register a gradient hook on each gate output; when backward reaches it, the
fused kernel (ops.taylor_reduce, "per_sample") reads activation and gradient once and adds
``z[n, c]`` into the group's buffer for the batch, in place. The hooks keep a reference to each
gate output (no copy), which autograd mostly keeps anyway.

At the end of each batch, a group's z is reduced over the samples into its running total:
``abs_sum`` |sum_n z| (the total is the signed sum, made absolute when read), ``sum_abs``
sum_n |z|, ``sum_sq`` sum_n z**2. A batch with NaN or Inf anywhere raises, or is skipped and
counted (``nonfinite="skip"``; overflowing GradScaler steps are skipped that way).

Which gradient is back-propagated (``grad``):
  - ``"loss"``: the plain gradient of the loss;
  - ``"normalized"`` (the default; Sapkota et al. 2023): each sample's gradient at the network
    output rescaled to unit L2 norm, so that every sample weighs the same; a sample whose output
    gradient is zero is skipped (counted in ``skipped_samples``), not divided by zero;
  - ``"random"``: a random unit-norm output gradient per sample, from a seeded generator: no
    labels and no loss.

score() back-propagates exactly that gradient, with the model in eval mode: running statistics
are used and not updated, dropout is off, the model is scored as it will run, and the backward of
every layer is separable per sample. Inside a training step (Pruner.scoring) there is no extra
backward: a hook on the output reads dL/dy and hands the kernel the per-sample factor
1 / ||dL/dy_n||. That equals score()'s normalized mode wherever the backward is separable per
sample (eval-mode BatchNorm, GroupNorm, InstanceNorm); under train-mode BatchNorm the batch
statistics couple the samples and it is an approximation (tests/test_scoring.py measures it).
"""

import contextlib
import itertools
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from .. import choices, ops
from .._inputs import device_of, split_batch
from .._modes import evaluating
from .._progress import progress as progress_bar
from ..choices import Backend, Grad, NonFinite, Reduce
from ..ops import reference
from ..structure.analysis import Analysis, analyze
from ..structure.spaces import Gate
from .scores import Scores, weigh_scores


class TaylorAccumulator:
    """Gate hooks and per-group score buffers for one Analysis of one model.

    ``with acc.attached():`` installs the hooks; every backward inside adds each sample's z to
    the batch buffers; ``end_batch()`` checks them and folds them into the running totals.
    ``scale``, when set (by an output hook), is the per-sample factor the kernel applies."""

    def __init__(self, model: torch.nn.Module, analysis: Analysis, *, reduce: Reduce = "abs_sum",
                 backend: Backend = "fused", nonfinite: NonFinite = "raise"):
        choices.check("reduce", reduce, Reduce)
        choices.check("backend", backend, Backend)
        choices.check("nonfinite", nonfinite, NonFinite)
        if not analysis.prunable:
            raise ValueError("the model has no prunable channel groups; analysis report:\n"
                             + analysis.report())
        self.model, self.analysis = model, analysis
        self.reduce, self.backend, self.nonfinite = reduce, backend, nonfinite
        self.gates: dict[str, list[tuple[int, Gate]]] = {}  # module name -> its gates, by group
        for i, group in enumerate(analysis.groups):
            if group.prunable:
                for gate in group.gates:
                    self.gates.setdefault(gate.module, []).append((i, gate))
        self.names = {id(model.get_submodule(n)): n for n in self.gates}
        self.scale: Optional[torch.Tensor] = None
        self.batch: dict[int, torch.Tensor] = {}  # group index -> (N, size) z of this batch
        self.totals: dict[int, torch.Tensor] = {}  # group index -> (size,) float64 running total
        self.batches = self.skipped_batches = self.skipped_samples = 0

    @contextlib.contextmanager
    def attached(self) -> Iterator["TaylorAccumulator"]:
        handles = [self.model.get_submodule(name).register_forward_hook(self._forward_hook)
                   for name in self.gates]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, module: torch.nn.Module, inputs: Any, out: Any) -> None:
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return
        entries = self.gates[self.names[id(module)]]
        # An in-place op after the gate (other than relu/hardtanh, for which a * dy/da is the
        # same before and after) would change the activation the gradient hook reads: copy it.
        act = out.detach().clone() if any(g.copy for _, g in entries) else out.detach()
        out.register_hook(lambda grad: self._accumulate(act, grad, entries))

    def _accumulate(self, act: torch.Tensor, grad: torch.Tensor,
                    entries: list[tuple[int, Gate]]) -> None:
        for i, gate in entries:
            size = self.analysis.groups[i].size
            a = act.narrow(gate.dim, gate.offset, size).movedim(gate.dim, 1)
            g = grad.narrow(gate.dim, gate.offset, size).movedim(gate.dim, 1)
            scale = None if self.scale is None else self.scale.to(a.device)
            if i not in self.batch:
                self.batch[i] = a.new_zeros((a.shape[0], size), dtype=ops.accumulation_dtype(a.dtype))
            if self.backend == "fused":
                ops.taylor_reduce(a, g, scale, reduce="per_sample", out=self.batch[i])
            else:
                self.batch[i] += reference.taylor_reduce(a, g, scale, reduce="per_sample",
                                                         dtype=self.batch[i].dtype)

    def end_batch(self) -> bool:
        """Fold the batch into the totals; False if it was skipped (NaN or Inf, or no backward)."""
        batch, self.batch, self.scale = self.batch, {}, None
        if not batch:
            return False
        finite = torch.stack([z.isfinite().all() for z in batch.values()]).all()
        if not bool(finite):
            if self.nonfinite == "raise":
                bad = [self.analysis.groups[i].gates[0].module for i, z in batch.items()
                       if not z.isfinite().all()]
                raise FloatingPointError(
                    f"NaN or Inf in activations or gradients at {bad[:5]} (batch {self.batches + 1});"
                    " pass nonfinite='skip' to skip such batches (GradScaler overflows, for example)")
            self.skipped_batches += 1
            return False
        for i, z in batch.items():
            z = z.double()
            part = z.sum(0) if self.reduce == "abs_sum" else z.abs().sum(0) if \
                self.reduce == "sum_abs" else z.square().sum(0)
            self.totals[i] = self.totals[i] + part if i in self.totals else part
        self.batches += 1
        return True

    def scores(self) -> dict:
        """{group index: per-channel score}; under torch.distributed, summed over every rank
        first (one all_reduce), so that all ranks choose the same channels."""
        indices = [i for i, g in enumerate(self.analysis.groups) if g.prunable]
        device = next(iter(self.totals.values())).device if self.totals else torch.device("cpu")
        totals = [self.totals.get(i, torch.zeros(self.analysis.groups[i].size, dtype=torch.float64,
                                                 device=device)) for i in indices]
        flat = torch.cat(totals)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)
        if self.reduce == "abs_sum":
            flat = flat.abs()
        return dict(zip(indices, flat.cpu().split([t.numel() for t in totals])))


def unit_output_gradient(grad_y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each sample's output gradient scaled to unit L2 norm; zero-gradient samples stay zero.
    Returns (normalized gradient, number of zero samples)."""
    norms = grad_y.flatten(1).norm(dim=1).view(-1, *[1] * (grad_y.dim() - 1))
    zero = norms == 0
    return torch.where(zero, 0.0, grad_y / norms.clamp_min(torch.finfo(norms.dtype).tiny)), int(zero.sum())


def per_sample_scale(grad_y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """1 / ||dL/dy_n|| per sample (0 where the gradient is zero: that sample is skipped)."""
    norms = grad_y.detach().flatten(1).double().norm(dim=1)
    return torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0), int((norms == 0).sum())


def score(model: torch.nn.Module, loader: Optional[Iterable], *,
          loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None, grad: Grad = "normalized",
          reduce: Reduce = "abs_sum", num_batches: Optional[int] = None,
          analysis: Optional[Analysis] = None, example_input: Optional[torch.Tensor] = None,
          backend: Backend = "fused", normalize_layers: bool = False, flops_weighted: bool = False,
          nonfinite: NonFinite = "raise", seed: int = 0, progress: bool = True) -> Scores:
    """TaylorFO scores: one per channel of every prunable group of ``model`` (higher = keep).

    Runs ``num_batches`` batches of ``loader`` (all by default; (images, targets) pairs, dicts
    with "image" and "mask", or image tensors with grad="random") with gradient mode ``grad``
    and batch reduction ``reduce`` (see the module docstring); ``loss_fn(output, target)`` is
    required unless grad="random". ``normalize_layers`` divides each group's scores by their L2
    norm (Molchanov et al. 2017); ``flops_weighted`` divides by the forward FLOPs one channel of
    the group costs (after the normalisation, when both are set). A run that scores no batch (an
    empty loader, or every batch skipped for NaN or Inf) raises rather than return all-zero
    scores. The analysis is made from the first batch's first image (or ``example_input``)
    unless given. The model is left as it was: every submodule in its own mode, no .grad
    written, no statistics updated. Data-free baselines: polyprune_ext.baseline_scores.
    """
    choices.check("grad", grad, Grad)
    if grad != "random" and loss_fn is None:
        raise ValueError(f"grad={grad!r} needs loss_fn(output, target); or use grad='random'")
    device = device_of(model)
    batches = iter(loader) if loader is not None else iter(())
    first = []  # a batch taken to analyse the model, scored first
    if analysis is None:
        if example_input is None:
            first = list(itertools.islice(batches, 1))
            if not first:
                raise ValueError("pass example_input, or a loader that yields batches")
            example_input = split_batch(first[0], False)[0][:1]
        analysis = analyze(model, example_input.to(device))
    acc = TaylorAccumulator(model, analysis, reduce=reduce, backend=backend, nonfinite=nonfinite)
    total = num_batches if num_batches is not None else getattr(loader, "__len__", lambda: None)()
    generator = torch.Generator(device=device).manual_seed(seed)
    loss_fn = None if grad == "random" else loss_fn
    with eval_without_weight_grads(model), acc.attached():
        read = sum(_score_batch(model, acc, batch, loss_fn, grad, generator, device)
                   for batch in progress_bar(itertools.islice(itertools.chain(first, batches), num_batches),
                                             total, progress, "scoring"))
    if acc.batches == 0:  # all-zero scores would make the pruning choose channels arbitrarily
        raise RuntimeError(f"no batch was scored ({read} read, {acc.skipped_batches} skipped for "
                           "NaN or Inf under nonfinite='skip'): pass a loader that yields finite "
                           "batches")
    values = weigh_scores(acc.scores(), analysis, normalize_layers, flops_weighted)
    return Scores(values, analysis, acc.batches, acc.skipped_batches, acc.skipped_samples)


@contextlib.contextmanager
def eval_without_weight_grads(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode with no parameter needing a gradient (activations still get
    theirs); every submodule's mode and every requires_grad flag restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    with evaluating(model):
        try:
            for p in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)


def _score_batch(model: torch.nn.Module, acc: TaylorAccumulator, batch: Any,
                 loss_fn: Optional[Callable], grad: Grad, generator: torch.Generator,
                 device: torch.device) -> int:
    """One batch through the model and back with the gradient mode's output gradient (random
    when there is no loss_fn); returns 1 (a batch read) whether it was scored or skipped."""
    x, target = split_batch(batch, grad != "random")
    x = x.to(device).requires_grad_(True)
    y = model(x)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the model returned {type(y).__name__}; score() needs a tensor")
    if loss_fn is None:  # grad == "random"
        g = torch.randn(y.shape, generator=generator, device=device, dtype=y.dtype)
    else:
        (g,) = torch.autograd.grad(loss_fn(y, target.to(device)), y)
    if grad != "loss":
        g, zeros = unit_output_gradient(g)
        acc.skipped_samples += zeros
    y.backward(g)
    acc.end_batch()
    return 1
