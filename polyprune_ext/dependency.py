"""Which channels of a model must be removed together: channel groups, found by tracing.

A forward pass on an example input is recorded at the dispatcher, where every aten op the model
actually executes passes, Python control flow already resolved (torch.fx would stop at it, and the
autograd graph hides ops that do not need gradients). Every activation is given a *channel space*:
the list of groups whose channels make up its dim 1, in order. Ops then act on spaces:

- a convolution starts a new group for its output channels, and its input channels become
  consumer slots (weight dim 1, at each input group's offset) of the groups it reads;
- a depthwise convolution keeps its input's space (its weight rows follow the input channels);
- norms add their parameters and statistics to the groups they read;
- element-wise ops, pooling, resizing and padding pass the space through;
- adds and multiplies of two activations tie their groups (residuals, attention gates);
- concatenation along channels joins spaces (U-Net skips), so consumers see offsets.

Never guess: an op not in these rules, or a rule's precondition not met, freezes every group it
touches, and the report says which op and why. The model's inputs and outputs are frozen too (the
image channels and the classes are fixed).
"""

import dataclasses
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .model_stats import forward_once

aten = torch.ops.aten

# Ops whose first output keeps the channel space of their first input.
PASS_THROUGH = {
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.sigmoid, aten.sigmoid_,
    aten.hardtanh, aten.hardtanh_, aten.hardswish, aten.hardswish_, aten.hardsigmoid,
    aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_, aten.mish, aten.tanh, aten.clamp,
    aten.clone, aten.detach, aten.alias, aten._to_copy, aten.dropout, aten.native_dropout,
    aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, aten.avg_pool2d, aten.avg_pool3d,
    aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.upsample_nearest2d,
    aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.constant_pad_nd, aten.reflection_pad2d,
    aten.replication_pad2d,
}
# Two-operand element-wise ops: operands with channels tie their groups.
ELEMENTWISE = {aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_}
BATCH_NORMS = {aten.native_batch_norm, aten._native_batch_norm_legit_no_training,
               aten._native_batch_norm_legit, aten.cudnn_batch_norm}
# Ops that create tensors from nothing, or only read shapes: nothing to follow.
SOURCES = {aten.empty, aten.zeros, aten.ones, aten.full, aten.randn, aten.rand, aten.arange}


@dataclasses.dataclass(frozen=True)
class Slot:
    """Channels of one group inside one dim of a parameter or buffer: [offset, offset + size)."""

    name: str
    dim: int
    offset: int


@dataclasses.dataclass
class ChannelGroup:
    size: int
    slots: list = dataclasses.field(default_factory=list)
    # (module name, offset): the module's output carries the group's channels from dim-1 offset
    # on. Where all of them are zero, the group contributes nothing downstream.
    gates: list = dataclasses.field(default_factory=list)
    frozen: list = dataclasses.field(default_factory=list)  # why they cannot be pruned

    @property
    def prunable(self) -> bool:
        return not self.frozen


class _Groups:
    """Groups with union-find: tying two groups makes them one."""

    def __init__(self):
        self.groups: list[ChannelGroup] = []
        self.parent: list[int] = []

    def new(self, size, *, frozen=None, gate=None):
        self.groups.append(ChannelGroup(size, frozen=[frozen] if frozen else [],
                                        gates=[gate] if gate else []))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g):
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def get(self, g) -> ChannelGroup:
        return self.groups[self.find(g)]

    def tie(self, a, b, why):
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        ga, gb = self.groups[a], self.groups[b]
        if ga.size != gb.size:  # cannot be one group: keep both whole
            self.freeze([a, b], f"{why}: ties groups of {ga.size} and {gb.size} channels")
            return
        self.parent[b] = a
        ga.slots += gb.slots
        ga.gates += [m for m in gb.gates if m not in ga.gates]
        ga.frozen += gb.frozen

    def freeze(self, groups, why):
        for g in groups:
            group = self.get(g)
            if why not in group.frozen:
                group.frozen.append(why)

    def roots(self):
        return [self.groups[g] for g in range(len(self.groups)) if self.parent[g] == g]


class _Tracer(TorchDispatchMode):
    def __init__(self, names_by_storage):
        super().__init__()
        self.names = names_by_storage  # storage pointer -> parameter or buffer name
        self.groups = _Groups()
        self.space = {}  # id(tensor) -> list of group ids along dim 1
        self.flops_per_weight = {}  # conv weight name -> FLOPs per weight element, this input
        self.alive = []  # keeps traced tensors alive so their ids stay unique

    def channels(self, t):
        return self.space.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set_space(self, t, space):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            self.space[id(t)] = space
            self.alive.append(t)

    def name_of(self, t):
        return self.names.get(t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) else None

    def add_gates(self, space, module):
        offset = 0
        for g in space:
            self.groups.get(g).gates.append((module, offset))
            offset += self.groups.get(g).size

    def add_slots(self, space, name, dim):
        offset = 0
        for g in space:
            self.groups.get(g).slots.append(Slot(name, dim, offset))
            offset += self.groups.get(g).size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        first_out = out[0] if isinstance(out, (tuple, list)) else out
        inputs = [t for t in tree_leaves((args, kwargs)) if self.channels(t) is not None]
        if packet in SOURCES or not inputs and packet is not aten.convolution:
            return out
        if packet is aten.convolution:
            self.convolution(args, first_out, func)
        elif packet in BATCH_NORMS:
            self.batch_norm(args, first_out)
        elif packet in PASS_THROUGH and self.channels(args[0]) is not None and \
                first_out.dim() == args[0].dim() and first_out.shape[1] == args[0].shape[1]:
            self.set_space(first_out, self.channels(args[0]))
        elif packet in ELEMENTWISE:
            self.elementwise(args, first_out, func)
        elif packet is aten.mean and self.reduces_spatial_only(args):
            self.set_space(first_out, self.channels(args[0]))
        elif packet is aten.cat and (args[1] if len(args) > 1 else kwargs.get("dim", 0)) == 1:
            self.concatenate(args[0], first_out, func)
        else:
            why = f"{func} is not understood"
            self.groups.freeze([g for t in inputs for g in self.channels(t)], why)
            self.frozen_space(first_out, why)  # what follows can still be pruned
        return out

    def frozen_space(self, t, why):
        """The channels of a tensor the rules cannot follow: one frozen group."""
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            self.set_space(t, [self.groups.new(t.shape[1], frozen=why)])
        return self.channels(t)

    def reduces_spatial_only(self, args):
        dims = args[1] if len(args) > 1 else None
        keepdim = len(args) > 2 and args[2]
        return dims is not None and keepdim and all(d % args[0].dim() >= 2 for d in dims)

    def convolution(self, args, out, func):
        x, weight, bias = args[0], args[1], args[2]
        transposed, groups = args[6], args[8]
        name, bias_name = self.name_of(weight), self.name_of(bias)
        space = self.channels(x) or self.frozen_space(x, f"{func} input of unknown origin")
        module = name.rsplit(".", 1)[0] if name else None
        if name is None or bias is not None and bias_name is None:
            why = f"{func} with a weight or bias that is not a parameter of the model"
            self.groups.freeze(space, why)
            self.frozen_space(out, why)
            return
        in_channels, out_channels = x.shape[1], out.shape[1]
        # Every weight element is one multiply-add (2 FLOPs) per position of the output (of the
        # input, for a transposed conv) in every sample: the count torch.utils.flop_counter gives.
        positions = (x if transposed else out).shape[2:].numel() * out.shape[0]
        self.flops_per_weight[name] = self.flops_per_weight.get(name, 0) + 2 * positions
        if groups == 1:
            self.add_slots(space, name, 0 if transposed else 1)
            group = self.groups.new(out_channels, gate=(module, 0))
            self.groups.get(group).slots.append(Slot(name, 1 if transposed else 0, 0))
            if bias_name:
                self.groups.get(group).slots.append(Slot(bias_name, 0, 0))
            self.set_space(out, [group])
        elif groups == in_channels == out_channels and not transposed:  # depthwise
            self.add_slots(space, name, 0)
            if bias_name:
                self.add_slots(space, bias_name, 0)
            self.add_gates(space, module)
            self.set_space(out, space)
        else:
            why = f"{module}: grouped convolution ({groups} groups)"
            self.groups.freeze(space, why)
            self.frozen_space(out, why)

    def batch_norm(self, args, out):
        x, params = args[0], args[1:5]
        space = self.channels(x)
        names = [self.name_of(t) for t in params if t is not None]
        if space is None:
            return
        if None in names:
            self.groups.freeze(space, "batch norm with parameters that are not the model's")
        for name in filter(None, names):
            self.add_slots(space, name, 0)
        if names:
            self.add_gates(space, names[0].rsplit(".", 1)[0])
        self.set_space(out, space)

    @staticmethod
    def varies_per_channel(t, like):
        """Whether t, broadcast against the activation `like`, holds a value per channel of it."""
        if not isinstance(t, torch.Tensor):
            return False
        i = 1 - (like.dim() - t.dim())  # t's dim that lines up with like's channels
        return 0 <= i < t.dim() and t.shape[i] != 1

    def elementwise(self, args, out, func):
        a, b = args[0], args[1] if len(args) > 1 else None
        sa, sb = self.channels(a), self.channels(b)
        if sa is not None and sb is not None and a.dim() == b.dim() and a.shape[1] == b.shape[1]:
            if [self.groups.get(g).size for g in sa] != [self.groups.get(g).size for g in sb]:
                self.groups.freeze(sa + sb, f"{func} of differently concatenated channels")
            else:
                for ga, gb in zip(sa, sb):
                    self.groups.tie(ga, gb, str(func))
            self.set_space(out, sa)
        elif sa is not None and not self.varies_per_channel(b, a):  # b: scalar, or one per sample
            self.set_space(out, sa)
        elif sb is not None and not self.varies_per_channel(a, b):
            self.set_space(out, sb)
        else:  # e.g. a per-channel scale the rules do not follow: its channels stay
            why = f"{func} with a per-channel operand that is not traced"
            self.groups.freeze((sa or []) + (sb or []), why)
            self.frozen_space(out, why)

    def concatenate(self, tensors, out, func):
        spaces = [self.channels(t) or self.frozen_space(t, f"{func} input of unknown origin")
                  for t in tensors]
        self.set_space(out, [g for s in spaces for g in s])


@dataclasses.dataclass
class Analysis:
    groups: list  # ChannelGroup, prunable and frozen
    shapes: dict  # parameter name -> shape
    flops_per_weight: dict  # conv weight name -> FLOPs per weight element on the example input

    @property
    def prunable(self):
        return [g for g in self.groups if g.prunable]

    def check_prunable(self, i: int) -> None:
        """ValueError, saying why, unless group ``i`` may be pruned."""
        if not self.groups[i].prunable:
            raise ValueError(f"group {i} cannot be pruned: {'; '.join(self.groups[i].frozen)}")

    def report(self) -> str:
        """The frozen groups and why, one line each."""
        lines = []
        for g in self.groups:
            if g.frozen:
                where = ", ".join(m for m, _ in g.gates) or "(no module)"
                lines.append(f"{g.size} channels at {where}: {'; '.join(g.frozen)}")
        return "\n".join(lines)


def analyze(model: torch.nn.Module, example_input: Any) -> Analysis:
    """Channel groups of ``model`` from one forward pass on ``example_input`` (a tensor or a tuple
    of positional arguments), run by forward_once. Every activation of that pass is held until
    it ends (their ids name the channel spaces), so a
    batch of one is enough and cheapest."""
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    tracer = _Tracer({t.untyped_storage().data_ptr(): n for n, t in named.items() if t.numel()})
    for x in tree_leaves(example_input):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            tracer.set_space(x, [tracer.groups.new(x.shape[1], frozen="model input")])
    outputs = forward_once(model, example_input, tracer)
    for y in tree_leaves(outputs):
        tracer.groups.freeze(tracer.channels(y) or [], "model output")
    return Analysis(tracer.groups.roots(), {n: tuple(p.shape) for n, p in model.named_parameters()},
                    tracer.flops_per_weight)
