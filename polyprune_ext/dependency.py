"""Which channels of a model must be removed together: channel groups, found by tracing.

A forward pass on an example input is recorded at the dispatcher, where every aten op the model
actually executes passes, Python control flow already resolved (torch.fx would stop at it, and the
autograd graph hides ops that do not need gradients). Two composite functions whose aten pieces
lose their meaning, F.linear and F.instance_norm, are caught whole one level up, by a
TorchFunctionMode.

Every activation gets a *channel space*: the dim that holds its channels, and the list of groups
whose channels make up that dim, in order. Ops act on spaces:

- a convolution or linear layer starts a new group for its output channels, and its input channels
  become consumer slots (weight dim 1, at each input group's offset) of the groups it reads;
- a depthwise convolution keeps its input's space (its weight rows follow the input channels);
  a grouped convolution removes the same local channel from every conv group, so that the groups
  stay equal: its input space is split into blocks that are tied, and its output is one group
  repeated once per conv group;
- per-channel norms (batch norm, instance norm, group norm with one channel per group) and
  per-channel parameters (a layer scale, a bias) add their tensors to the groups they read;
- element-wise ops, pooling, resizing, padding and reductions over other dims pass the space
  through; views, permutes and transposes move the channel dim, and slicing, split and chunk map
  whole groups back;
- adds and multiplies of two activations tie their groups (residuals, attention gates);
- concatenation along channels joins spaces (U-Net skips), so consumers see offsets; stacking or
  concatenating along another dim ties them.

Never guess: an op not in these rules, or a rule's precondition not met (a norm that mixes
channels, such as layer norm over channels or group norm with several channels per group, or a
reshape that splits the channel dim into heads), freezes every group it touches, and the report
says which op, in which module, and why. The model's inputs and outputs are frozen too (the image
channels and the classes are fixed), and so are the channels of ignored modules.

Gates. Each group names the module outputs where its channels can be observed and zeroed (for
scoring, and for the tests' proof that a prune is right): removing a channel is the same as
zeroing it at all of its gates. A gate is proposed where an op sets a channel's values (a conv, a
norm, a per-channel scale, an op that does not keep zeros zero such as sigmoid) and becomes a gate
at the first module output it reaches through zero-keeping ops (activations, pooling, views, adds
of gated tensors). A proposal read only by per-channel ops (a conv's output read by its batch
norm) is superseded by theirs and dropped. A group whose channels are consumed where no module
output can observe them is frozen.
"""

import collections
import dataclasses
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .model_stats import forward_once

aten = torch.ops.aten

# Element-wise ops that map zero to zero: the output keeps the input's space and gates.
ZERO_KEEPING = {
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.hardtanh, aten.hardtanh_,
    aten.hardswish, aten.hardswish_, aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_,
    aten.mish, aten.tanh, aten.clone, aten.detach, aten.alias, aten._to_copy, aten.dropout,
    aten.native_dropout,
}
# Element-wise ops that do not: the output keeps the space, and needs a gate of its own.
VALUE_SETTING = {aten.sigmoid, aten.sigmoid_, aten.hardsigmoid, aten.exp, aten.clamp, aten.softplus}
# Ops over the dims after the channels (dim 1) that keep zeros zero.
SPATIAL = {
    aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, aten.avg_pool2d, aten.avg_pool3d,
    aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.upsample_nearest2d,
    aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.reflection_pad2d, aten.replication_pad2d,
    aten.constant_pad_nd,
}
REDUCTIONS = {aten.mean, aten.sum, aten.amax, aten.amin}
VIEWS = {aten.view, aten._unsafe_view, aten.reshape, aten.expand, aten.unsqueeze, aten.squeeze,
         aten.permute, aten.transpose, aten.t}
ELEMENTWISE = {aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_}
BATCH_NORMS = {aten.native_batch_norm, aten._native_batch_norm_legit_no_training,
               aten._native_batch_norm_legit, aten.cudnn_batch_norm}
# Ops that create tensors from nothing, or only read shapes: nothing to follow.
SOURCES = {aten.empty, aten.zeros, aten.ones, aten.full, aten.randn, aten.rand, aten.arange,
           aten.zeros_like, aten.ones_like, aten.empty_like}


@dataclasses.dataclass(frozen=True)
class Slot:
    """Channels of one group inside one dim of a parameter or buffer: [offset, offset + size)."""

    name: str
    dim: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Gate:
    """The output of ``module`` carries the group's channels in dim ``dim``, from ``offset`` on."""

    module: str
    offset: int
    dim: int = 1
    # An in-place op changes the output after the module returns it (other than relu and
    # hardtanh, after which activation * gradient is unchanged): scoring must copy it.
    copy: bool = False


@dataclasses.dataclass
class ChannelGroup:
    size: int
    slots: list = dataclasses.field(default_factory=list)
    gates: list = dataclasses.field(default_factory=list)  # Gate; zeroed together = removed
    frozen: list = dataclasses.field(default_factory=list)  # why they cannot be pruned
    # While tracing: (gate, proposal) pairs, kept as gates if the proposal was consumed.
    proposed: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def prunable(self) -> bool:
        return not self.frozen


class Space(NamedTuple):
    dim: int  # the tensor dim that holds the channels
    groups: list  # group ids along it, in order


@dataclasses.dataclass(eq=False)
class _Proposal:
    """A tensor whose channel values an op has just set: a gate once a module returns it."""

    module: Optional[str] = None  # the module whose output it became
    consumed: bool = False  # read by an op other than a per-channel one
    changed_in_place: bool = False  # after the module returned it (see Gate.copy)


class _Groups:
    """Groups with union-find: tying two groups makes them one."""

    def __init__(self):
        self.groups: list[ChannelGroup] = []
        self.parent: list[int] = []

    def new(self, size, *, frozen=None):
        self.groups.append(ChannelGroup(size, frozen=[frozen] if frozen else []))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g):
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def get(self, g) -> ChannelGroup:
        return self.groups[self.find(g)]

    def sizes(self, space):
        return [self.get(g).size for g in space]

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
        ga.proposed += gb.proposed
        ga.frozen += [w for w in gb.frozen if w not in ga.frozen]

    def freeze(self, groups, why):
        for g in groups:
            group = self.get(g)
            if why not in group.frozen:
                group.frozen.append(why)

    def roots(self):
        return [self.groups[g] for g in range(len(self.groups)) if self.parent[g] == g]


class _Tracer(TorchDispatchMode):
    def __init__(self, tensors):
        super().__init__()
        self.tensors = tensors  # parameter or buffer name -> tensor
        self.names = {t.untyped_storage().data_ptr(): n for n, t in tensors.items() if t.numel()}
        self.groups = _Groups()
        self.space = {}  # id(tensor) -> Space
        # id(tensor) -> {group id: proposals whose gates, zeroed, zero the group's channels in
        # the tensor}. A group missing from the dict has no such guarantee there.
        self.origin = {}
        self.flops_per_weight = {}  # conv/linear weight name -> FLOPs per weight element
        self.alive = []  # keeps traced tensors alive so their ids stay unique
        self.stack = []  # names of the modules being run, outermost first
        self.returned = {}  # id(module output) -> the proposals that became its gates
        self.paused = False  # inside a function the function mode handles whole

    # -- spaces and gates ------------------------------------------------------------------------

    def channels(self, t) -> Optional[Space]:
        return self.space.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set_space(self, t, space, origin=None):
        """Give t a space; ``origin`` maps groups to the proposals that gate them in t."""
        if isinstance(t, torch.Tensor):
            self.space[id(t)] = space
            self.origin[id(t)] = origin or {}
            self.alive.append(t)

    def origin_of(self, t):
        return {self.groups.find(g): p for g, p in self.origin.get(id(t), {}).items()}

    def propose(self, out, space):
        """The op making ``out`` set the values of its channels: a new gate is proposed there,
        one per group (each group keeps, or drops, its own)."""
        self.set_space(out, space, {g: frozenset([(_Proposal(), False)]) for g in space.groups})

    def read(self, t, per_channel=False):
        """An op reads t's channels. A per-channel op (a norm) sets new values and proposes its
        own gate; any other reader needs every group's values to be gated in t."""
        space = self.channels(t)
        if space is None or per_channel:
            return
        origin = self.origin_of(t)
        for g in space.groups:
            proposals = origin.get(self.groups.find(g))
            if (not proposals or not all(gated for _, gated in proposals)) and \
                    self.groups.get(g).prunable:
                self.groups.freeze([g], f"its channels are used{self.where()} before any module "
                                        "output where they could be observed")
            for proposal, _ in proposals or ():
                proposal.consumed = True

    def module_output(self, name, out):
        """A module returned ``out``: proposals that reach it become gates of this module.
        Channels with no gate there, or several (a residual sum, not read on the way), get one
        new gate here instead: zeroing the sum zeroes all that follows, and the summands need
        neither a gate nor a copy (torchvision adds the shortcut in place into bn2's output)."""
        space = self.channels(out)
        if space is None:
            return
        origin, offset = self.origin_of(out), 0
        for g in space.groups:
            root, size = self.groups.find(g), self.groups.get(g).size
            gate = Gate(name, offset, space.dim)
            proposals = origin.get(root)
            if not proposals or len({p for p, _ in proposals}) > 1:
                proposals = frozenset([(_Proposal(), False)])
            gated = set()
            for proposal, is_gated in proposals:
                if proposal.module is None:
                    proposal.module = name
                    self.returned.setdefault(id(out), []).append(proposal)
                if proposal.module == name:  # a group repeated in the space gets a gate per block
                    self.groups.get(g).proposed.append((gate, proposal))
                gated.add((proposal, is_gated or proposal.module == name))
            origin[root] = frozenset(gated)
            offset += size
        self.origin[id(out)] = origin

    def where(self):
        return f" in {self.stack[-1]}" if self.stack else ""

    def unknown(self, inputs, out, why):
        """Freeze what an op touches. Its outputs are not followed: where their channels are is
        unknown, and a layer that reads them sees an input of unknown origin."""
        why += self.where()
        for t in inputs:
            if self.channels(t) is not None:
                self.groups.freeze(self.channels(t).groups, why)

    def frozen_space(self, t, why, dim=1):
        """The channels, in ``dim``, of a tensor the rules cannot follow: one frozen group."""
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            dim %= t.dim()
            self.set_space(t, Space(dim, [self.groups.new(t.shape[dim], frozen=why)]))
        return self.channels(t)

    def name_of(self, t):
        return self.names.get(t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) else None

    def add_slots(self, space, name, dim):
        offset = 0
        for g in space.groups:
            self.groups.get(g).slots.append(Slot(name, dim, offset))
            offset += self.groups.get(g).size

    # -- dispatch --------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        packet = func.overloadpacket
        inputs = [t for t in tree_leaves((args, kwargs)) if self.channels(t) is not None]
        if packet in SOURCES or not inputs and packet is not aten.convolution:
            return out
        x, first = args[0], out[0] if isinstance(out, (tuple, list)) else out
        if first is x and packet not in (aten.relu_, aten.hardtanh_):  # changed in place
            for proposal in self.returned.get(id(x), ()):
                proposal.changed_in_place = True
        space = self.channels(x)
        same_shape = isinstance(first, torch.Tensor) and space is not None and first.shape == x.shape
        if packet is aten.convolution:
            self.convolution(args, out, func)
        elif packet in BATCH_NORMS:
            self.per_channel_norm(x, args[1:5], first, str(func))
        elif packet is aten.native_group_norm:
            self.group_norm(args, first, func)
        elif packet is aten.native_layer_norm:
            normalized = range(x.dim() - len(args[1]), x.dim())
            if space is None or space.dim in normalized:
                self.unknown(inputs, out, "layer norm normalizes across channels: removing one "
                                          "would change the others")
            else:
                self.read(x)  # its weights are per position, not per channel
                self.propose(first, space)
        elif packet in ZERO_KEEPING and same_shape:
            self.set_space(first, space, self.origin.get(id(x)))
        elif packet in VALUE_SETTING and same_shape:
            self.read(x)
            self.propose(first, space)
        elif packet is aten._softmax and same_shape and args[1] % x.dim() != space.dim:
            self.read(x)
            self.propose(first, space)
        elif packet in SPATIAL and space is not None and space.dim == 1 and \
                first.dim() == x.dim() and first.shape[1] == x.shape[1]:
            if packet is aten.constant_pad_nd and len(args) > 2 and args[2] != 0:
                self.read(x)
                self.propose(first, space)
            else:
                self.set_space(first, space, self.origin.get(id(x)))
        elif packet in REDUCTIONS and space is not None and self.reduce(x, args, first):
            pass
        elif packet in VIEWS and space is not None and self.view(x, args, first, func):
            pass
        elif packet in (aten.select, aten.slice, aten.split, aten.split_with_sizes, aten.unbind) \
                and space is not None and self.index(x, args, out, func):
            pass
        elif packet in ELEMENTWISE:
            self.elementwise(args, first, func)
        elif packet in (aten.cat, aten.stack):
            self.join(args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0), first, func)
        else:
            self.unknown(inputs, out, f"{func} is not understood")
        return out

    # -- rules -----------------------------------------------------------------------------------

    def convolution(self, args, out, func):
        x, weight, bias = args[0], args[1], args[2]
        transposed, groups = args[6], args[8]
        name, bias_name = self.name_of(weight), self.name_of(bias)
        space = self.channels(x) or self.frozen_space(x, f"{func} input of unknown origin")
        module = name.rsplit(".", 1)[0] if name else None
        if name is None or bias is not None and bias_name is None:
            return self.unknown([x], out, f"{func} with a weight or bias that is not a parameter")
        if space.dim != 1:
            return self.unknown([x], out, f"{func} reads dim 1, the channels are in dim {space.dim}")
        in_channels, out_channels = x.shape[1], out.shape[1]
        # Every weight element is one multiply-add (2 FLOPs) per position of the output (of the
        # input, for a transposed conv) in every sample: the count torch.utils.flop_counter gives.
        positions = (x if transposed else out).shape[2:].numel() * out.shape[0]
        self.flops_per_weight[name] = self.flops_per_weight.get(name, 0) + 2 * positions
        if groups == 1:
            self.read(x)
            self.add_slots(space, name, 0 if transposed else 1)
            group = self.groups.new(out_channels)
            self.groups.get(group).slots.append(Slot(name, 1 if transposed else 0, 0))
            if bias_name:
                self.groups.get(group).slots.append(Slot(bias_name, 0, 0))
            self.propose(out, Space(1, [group]))
        elif groups == in_channels == out_channels and not transposed:  # depthwise: per channel
            self.read(x, per_channel=True)
            self.add_slots(space, name, 0)
            if bias_name:
                self.add_slots(space, bias_name, 0)
            self.propose(out, space)
        elif not transposed and in_channels > groups and self.split_into_blocks(space, groups):
            self.grouped_convolution(x, out, groups, name, bias_name)
        else:
            self.unknown([x], out, f"{module}: grouped convolution ({groups} groups) whose input "
                                   "channels do not split into whole groups' blocks")

    def grouped_convolution(self, x, out, groups, name, bias_name):
        """Conv group j reads input channels [j * wi, (j + 1) * wi) and writes output channels
        [j * wo, (j + 1) * wo); every conv group must keep as many channels as the others. So the
        same local channel goes from every conv group: the input space, already split into
        ``groups`` blocks of wi, is tied block to block, and the output is one group of wo
        channels repeated ``groups`` times (ResNeXt, RegNet)."""
        space = self.channels(x)
        self.read(x)
        for block in space.groups[1:]:
            self.groups.tie(space.groups[0], block, "grouped convolution")
        self.groups.get(space.groups[0]).slots.append(Slot(name, 1, 0))  # weight dim 1 is local
        width = out.shape[1] // groups
        group = self.groups.new(width)
        for j in range(groups):
            self.groups.get(group).slots.append(Slot(name, 0, j * width))
            if bias_name:
                self.groups.get(group).slots.append(Slot(bias_name, 0, j * width))
        self.propose(out, Space(1, [group] * groups))

    def split_into_blocks(self, space, blocks) -> bool:
        """Make ``space`` a list of ``blocks`` groups of equal size, each group of it that spans
        several blocks becoming one smaller group repeated (see _Groups.repeat); False, changing
        nothing, when a group boundary falls inside a block."""
        sizes = self.groups.sizes(space.groups)
        width = sum(sizes) // blocks
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        if any(size % width or offset % width for size, offset in zip(sizes, offsets)):
            return False
        for g in dict.fromkeys(self.groups.find(g) for g in space.groups):
            if self.groups.get(g).size > width:
                self.repeat(g, self.groups.get(g).size // width)
        return True

    def repeat(self, g, times):
        """Group g becomes a group of size / times channels, found ``times`` times in a row wherever
        g was: channel k now stands for channels k, k + size / times, ... of what g was. Its slots
        and proposed gates are repeated at each block's offset, and every space lists it ``times``
        times."""
        group = self.groups.get(g)
        width = group.size // times
        group.size = width
        group.slots = [dataclasses.replace(s, offset=s.offset + j * width)
                       for s in group.slots for j in range(times)]
        group.proposed = [(dataclasses.replace(gate, offset=gate.offset + j * width), p)
                          for gate, p in group.proposed for j in range(times)]
        root = self.groups.find(g)
        for key, space in self.space.items():
            if any(self.groups.find(h) == root for h in space.groups):
                self.space[key] = Space(space.dim, [h for h in space.groups for _ in
                                                    range(times if self.groups.find(h) == root else 1)])

    def linear(self, x, weight, bias, out):
        space, name, bias_name = self.channels(x), self.name_of(weight), self.name_of(bias)
        space = space or self.frozen_space(x, "linear input of unknown origin", dim=-1)
        if name is None or bias is not None and bias_name is None:
            return self.unknown([x], out, "linear with a weight or bias that is not a parameter")
        if space.dim != x.dim() - 1:
            return self.unknown([x], out, f"linear reads the last dim, the channels are in dim {space.dim}")
        self.read(x)
        self.add_slots(space, name, 1)
        positions = out.numel() // out.shape[-1]  # 2 FLOPs per weight element at each position
        self.flops_per_weight[name] = self.flops_per_weight.get(name, 0) + 2 * positions
        group = self.groups.new(out.shape[-1])
        self.groups.get(group).slots.append(Slot(name, 0, 0))
        if bias_name:
            self.groups.get(group).slots.append(Slot(bias_name, 0, 0))
        self.propose(out, Space(out.dim() - 1, [group]))

    def per_channel_norm(self, x, tensors, out, what):
        """A norm with statistics and parameters per channel of dim 1 (batch or instance norm)."""
        space = self.channels(x)
        names = [self.name_of(t) for t in tensors if t is not None]
        if space is None:
            return
        if None in names or space.dim != 1:
            return self.unknown([x], out, f"{what} with tensors that are not the model's, or "
                                          f"channels outside dim 1")
        self.read(x, per_channel=True)
        for name in names:
            self.add_slots(space, name, 0)
        self.propose(out, space)

    def group_norm(self, args, out, func):
        x, weight, bias, num_groups = args[0], args[1], args[2], args[6]
        space = self.channels(x)
        if space is not None and num_groups == x.shape[1]:  # one channel per group: per channel
            return self.per_channel_norm(x, [weight, bias], out, str(func))
        self.unknown([x], out, f"group norm of {x.shape[1] // num_groups} channels per group: "
                               "removing one would change the others")

    def reduce(self, x, args, out):
        space = self.channels(x)
        dims = args[1] if len(args) > 1 and isinstance(args[1], (int, list, tuple)) else ()
        dims = {d % x.dim() for d in ([dims] if isinstance(dims, int) else dims or range(x.dim()))}
        if space.dim in dims:
            return False
        keepdim = out.dim() == x.dim()
        dim = space.dim if keepdim else space.dim - sum(d < space.dim for d in dims)
        self.set_space(out, Space(dim, space.groups), self.origin.get(id(x)))
        return True

    def view(self, x, args, out, func):
        """Views and permutes that keep the channel dim whole move it; others are not followed."""
        space, packet = self.channels(x), func.overloadpacket
        if packet in (aten.permute, aten.transpose, aten.t):
            if packet is aten.t:
                order = list(range(x.dim()))[::-1]
            elif packet is aten.transpose:
                a, b = (d % x.dim() for d in args[1:3])
                order = list(range(x.dim()))
                order[a], order[b] = order[b], order[a]
            else:
                order = [d % x.dim() for d in args[1]]
            dim = order.index(space.dim)
        else:  # same elements in the same order: the channel dim survives where the
            # elements before it, and its size, are the same
            before = x.shape[:space.dim].numel()
            candidates = [d for d in range(out.dim()) if out.shape[:d].numel() == before
                          and out.shape[d] == x.shape[space.dim]]
            if packet is aten.expand:  # aligned from the right
                candidates = [space.dim + out.dim() - x.dim()]
            if not candidates:
                return False
            dim = candidates[0]
        self.set_space(out, Space(dim, space.groups), self.origin.get(id(x)))
        return True

    def index(self, x, args, out, func):
        """select, slice, split, unbind: across other dims the space passes; along the channels,
        pieces that are whole groups map back to them."""
        space, packet = self.channels(x), func.overloadpacket
        if packet in (aten.split, aten.split_with_sizes):
            dim = (args[2] if len(args) > 2 else 0) % x.dim()
        else:
            dim = (args[1] if len(args) > 1 else 0) % x.dim()
        pieces = list(out) if isinstance(out, (tuple, list)) else [out]
        if dim != space.dim:
            if packet in (aten.select, aten.unbind):
                new = Space(space.dim - (dim < space.dim), space.groups)
            else:
                new = space
            for piece in pieces:
                self.set_space(piece, new, self.origin.get(id(x)))
            return True
        if packet in (aten.select, aten.unbind):
            return False
        if packet is aten.slice:
            start, end = args[2] if len(args) > 2 else None, args[3] if len(args) > 3 else None
            step = args[4] if len(args) > 4 else 1
            start, _, _ = slice(start, end).indices(x.shape[dim])
            if step != 1:
                return False
            bounds = [(start, start + out.shape[dim])]
        else:
            sizes = [p.shape[dim] for p in pieces]
            bounds = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
        offsets, o = [], 0
        for size in self.groups.sizes(space.groups):
            offsets.append(o)
            o += size
        offsets.append(o)
        if any(a not in offsets or b not in offsets for a, b in bounds):
            return False  # a piece would cut a group
        for piece, (a, b) in zip(pieces, bounds):
            groups = space.groups[offsets.index(a):offsets.index(b)]
            self.set_space(piece, Space(space.dim, groups), self.origin.get(id(x)))
        return True

    def per_channel_operand(self, t, like):
        """The Slot dim of a parameter or buffer ``t`` that holds one value per channel of the
        activation ``like`` when broadcast against it; None if t is constant along them, False if
        it varies in a way the rules do not follow."""
        space = self.channels(like)
        if not isinstance(t, torch.Tensor):
            return None
        i = space.dim - (like.dim() - t.dim())  # t's dim that lines up with like's channels
        if not 0 <= i < t.dim() or t.shape[i] == 1:
            return None
        name = self.name_of(t)
        if name is None or t.numel() != t.shape[i]:
            return False
        param = self.tensors[name]
        dims = [d for d, n in enumerate(param.shape) if n != 1]
        return dims[0] if len(dims) == 1 and param.shape[dims[0]] == t.shape[i] else False

    def elementwise(self, args, out, func):
        a, b = args[0], args[1] if len(args) > 1 else None
        sa, sb = self.channels(a), self.channels(b)
        packet = func.overloadpacket
        product = packet in (aten.mul, aten.mul_, aten.div, aten.div_)
        if sa is not None and sb is not None:
            if a.dim() - sa.dim != b.dim() - sb.dim or a.shape[sa.dim] != b.shape[sb.dim]:
                if b.dim() - sa.dim > 0 and b.shape[b.dim() - (a.dim() - sa.dim)] == 1:
                    sb = None  # b is broadcast along a's channels (a spatial attention map)
                elif a.dim() - sb.dim > 0 and a.shape[a.dim() - (b.dim() - sb.dim)] == 1:
                    sa = None
                else:
                    return self.unknown([a, b], out, f"{func} of channels that do not line up")
        if sa is not None and sb is not None:
            if self.groups.sizes(sa.groups) != self.groups.sizes(sb.groups):
                return self.unknown([a, b], out, f"{func} of differently concatenated channels")
            for ga, gb in zip(sa.groups, sb.groups):
                self.groups.tie(ga, gb, str(func))
            oa, ob = self.origin_of(a), self.origin_of(b)
            if packet in (aten.div, aten.div_):
                self.read(b)
            origin = {}
            for g in sa.groups:
                g = self.groups.find(g)
                if product:  # zero when a is zero
                    origin[g] = oa.get(g) or (ob.get(g) if packet in (aten.mul, aten.mul_) else None)
                elif g in oa and g in ob:  # a sum is zero when both are
                    origin[g] = oa[g] | ob[g]
            self.set_space(out, Space(out.dim() - (a.dim() - sa.dim), sa.groups),
                           {g: p for g, p in origin.items() if p})
            return
        x, other = (a, b) if sa is not None else (b, a)
        space = self.channels(x)
        if x is b and packet in (aten.div, aten.div_, aten.sub, aten.sub_):
            return self.unknown([x], out, f"{func} with the activation as second operand")
        dim = self.per_channel_operand(other, x)
        if dim is False:
            return self.unknown([x], out, f"{func} with a per-channel operand that is not traced")
        new = Space(out.dim() - (x.dim() - space.dim), space.groups)
        if dim is not None:  # a per-channel parameter: a layer scale, or a bias
            self.add_slots(space, self.name_of(other), dim)
        if product:  # zero stays zero
            self.set_space(out, new, self.origin.get(id(x)))
        else:
            self.read(x, per_channel=True)
            self.propose(out, new)

    def join(self, tensors, dim, out, func):
        spaces = [self.channels(t) or self.frozen_space(t, f"{func} input of unknown origin")
                  for t in tensors]
        dims = {t.dim() - s.dim for t, s in zip(tensors, spaces)}  # channel dims from the right
        if len(dims) != 1:
            return self.unknown(tensors, out, f"{func} of tensors with channels in different dims")
        channel_dim = out.dim() - dims.pop()
        origins = [self.origin_of(t) for t in tensors]
        if func.overloadpacket is aten.cat and dim % out.dim() == channel_dim:
            groups = [g for s in spaces for g in s.groups]
            origin = {g: p for o in origins for g, p in o.items()}
            return self.set_space(out, Space(channel_dim, groups), origin)
        # Stacked, or concatenated along another dim: one channel dim holds all of them.
        first = spaces[0]
        for s, t in zip(spaces[1:], tensors[1:]):
            if self.groups.sizes(s.groups) != self.groups.sizes(first.groups):
                return self.unknown(tensors, out, f"{func} of differently concatenated channels")
            for ga, gb in zip(first.groups, s.groups):
                self.groups.tie(ga, gb, str(func))
        origin = {}
        for g in first.groups:
            g = self.groups.find(g)
            if all(g in o for o in origins):
                origin[g] = frozenset().union(*(o[g] for o in origins))
        self.set_space(out, Space(channel_dim, first.groups), origin)


class _Functions(TorchFunctionMode):
    """Catches F.linear and F.instance_norm whole: their aten pieces (a transposed weight, or a
    batch norm over a reshaped batch) would hide what they do."""

    def __init__(self, tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (F.linear, torch._C._nn.linear, F.instance_norm) or self.tracer.paused:
            return func(*args, **kwargs)
        self.tracer.paused = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.tracer.paused = False
        bound = dict(zip(("x", "weight", "bias"), args), **kwargs)
        if func is F.instance_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias")
            bound = dict(zip(names, args), **kwargs)
            tensors = [bound.get(n) for n in names[1:]]
            self.tracer.per_channel_norm(bound["input"], tensors, out, "instance norm")
        else:
            self.tracer.linear(bound.get("x", bound.get("input")), bound["weight"], bound.get("bias"), out)
        return out


@dataclasses.dataclass
class Analysis:
    groups: list  # ChannelGroup, prunable and frozen
    shapes: dict  # parameter name -> shape
    flops_per_weight: dict  # conv/linear weight name -> FLOPs per weight element, example input

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
                where = ", ".join(sorted({gate.module for gate in g.gates})) or "(no module output)"
                lines.append(f"{g.size} channels at {where}: {'; '.join(g.frozen)}")
        return "\n".join(lines)


def default_ignore(model: torch.nn.Module) -> tuple:
    """smp's heads, the segmentation head and the optional classification head, are kept whole,
    also inside a model holding smp models (NucleiNet's two branches)."""
    return tuple(n for n, m in model.named_modules()
                 if n.rpartition(".")[2] in ("segmentation_head", "classification_head"))


def analyze(model: torch.nn.Module, example_input: Any, ignore: Optional[tuple] = None) -> Analysis:
    """Channel groups of ``model`` from one forward pass on ``example_input`` (a tensor or a tuple
    of positional arguments), run by forward_once. Every activation of that pass is held until
    it ends (their ids name the channel spaces), so a batch of one is enough and cheapest.

    ``ignore``: names of modules whose output channels are kept (their input channels may still
    go when the layers before them are pruned). None means smp's heads (default_ignore)."""
    ignore = default_ignore(model) if ignore is None else tuple(ignore)
    names = {id(m): n for n, m in model.named_modules() if n}
    missing = [n for n in ignore if n not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"ignore names modules the model does not have: {missing}")
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    tracer = _Tracer(named)
    for x in tree_leaves(example_input):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            tracer.frozen_space(x, "model input")

    # A module called more than once (torchvision's BasicBlock uses one ReLU twice) cannot be a
    # gate: a hook on it would see every call. A first, untraced pass counts the calls.
    calls = collections.Counter()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.update([id(module)]))
    try:
        forward_once(model, example_input)
    finally:
        hook.remove()

    def enter(module, args):
        if id(module) in names:
            tracer.stack.append(names[id(module)])

    def leave(module, args, out):
        if id(module) in names:
            name = tracer.stack.pop()
            if not tracer.paused and isinstance(out, torch.Tensor) and calls[id(module)] == 1:
                tracer.module_output(name, out)

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        outputs = forward_once(model, example_input, _Functions(tracer), tracer)
    finally:
        for hook in hooks:
            hook.remove()
    for y in tree_leaves(outputs):
        tracer.groups.freeze((tracer.channels(y) or Space(1, [])).groups, "model output")
    for group in tracer.groups.roots():
        # Frozen groups keep every gate proposed, to say in the report where they are.
        group.gates = list(dict.fromkeys(dataclasses.replace(gate, copy=p.changed_in_place)
                                         for gate, p in group.proposed if p.consumed or group.frozen))
        if any(gate.module == n or gate.module.startswith(n + ".") for gate in group.gates
               for n in ignore):
            group.frozen.append("output channels of an ignored module")
        if not group.gates and not group.frozen:
            group.frozen.append("no module output observes its channels")
        group.proposed = []
    return Analysis(tracer.groups.roots(), {n: tuple(p.shape) for n, p in model.named_parameters()},
                    tracer.flops_per_weight)
