"""Op rules: what each op does to the channel spaces of its inputs and outputs.

A rule is a function ``rule(tracer, call)`` registered for aten or custom ops (their overload
packets, e.g. ``aten.convolution``, ``torch.ops.mylib.my_op``), for torch functions caught whole
(``F.linear``), or for module classes, whose calls it then sees whole (the ops inside are not
traced). ``call`` holds the arguments bound by name from the op schema or the signature
(``call["groups"]``), the result (``call.out``, ``call.first``), the first argument (``call.x``)
and what was called (``call.func``: the op, the function, or the module itself). The rule uses the
tracer's primitives (polyprune_ext.structure.analysis.Tracer) and returns False when the call is
used in a way it does not follow, which freezes every group the call touches. An op without a
rule is frozen the same way: the analysis never guesses.

A rule for your own layer, registered for every analysis or passed to one call:

    @polyprune_ext.rule(ChannelScale)          # forward(x): x * self.weight[None, :, None, None]
    def channel_scale(t, call):
        space = t.channels(call["x"])
        if space is None or space.dim != 1:
            return False
        t.add_slots(space, t.name_of(call.func.weight), 0)  # weight dim 0: the channels
        t.read(call["x"], per_channel=True)
        t.propose(call.out, space)                            # new values: a gate goes here

    analysis = polyprune_ext.analyze(model, x, rules={ChannelScale: channel_scale})
"""

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .spaces import Space

if TYPE_CHECKING:
    from .analysis import Tracer

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One op as a rule sees it: ``func``, its arguments by name, and what it returned."""

    func: Any
    args: dict[str, Any]
    out: Any

    def __getitem__(self, name: str) -> Any:
        return self.args[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.args.get(name, default)

    @property
    def x(self) -> Any:
        """The first argument (the input activation of most ops)."""
        return next(iter(self.args.values()), None)

    @property
    def first(self) -> Any:
        """The first output (the only one of most ops)."""
        return self.out[0] if isinstance(self.out, (tuple, list)) else self.out


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule function with how to call it. ``any_input``: also run when no argument carries
    traced channels (layers that start channels from any input); ``params``: the argument names
    of a Python function whose signature cannot be read (builtins such as torch._C._nn.linear)."""

    fn: Callable
    any_input: bool = False
    params: Optional[tuple[str, ...]] = None

    def __call__(self, tracer: "Tracer", call: OpCall) -> Optional[bool]:
        return self.fn(tracer, call)

    @classmethod
    def of(cls, fn: Callable) -> "Rule":
        return fn if isinstance(fn, Rule) else cls(fn)


RULES: dict[Any, Rule] = {}


def rule(*ops: Any, any_input: bool = False, params: Optional[Sequence[str]] = None) -> Callable:
    """Register the decorated function as the rule of ``ops`` (aten overload packets, custom ops
    or Python functions) for every analysis; returns the function unchanged."""
    def register(fn: Callable) -> Callable:
        for op in ops:
            RULES[op] = Rule(fn, any_input, tuple(params) if params else None)
        return fn
    return register


def bind(func: Any, args: Sequence, kwargs: dict[str, Any],
         params: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The arguments of a call by name: from the op schema (defaults filled in) for ops, from
    ``params`` or the signature for Python functions."""
    schema = getattr(func, "_schema", None)
    if schema is not None:
        bound = dict(zip((a.name for a in schema.arguments), args), **kwargs)
        for a in schema.arguments:
            if a.name not in bound and a.has_default_value():
                bound[a.name] = a.default_value
        return bound
    if params is None:
        signature = inspect.signature(func)
        params = list(signature.parameters)
        defaults = {n: p.default for n, p in signature.parameters.items()
                    if p.default is not inspect.Parameter.empty}
    else:
        defaults = {}
    return {**defaults, **dict(zip(params, args)), **kwargs}


# -- layers ------------------------------------------------------------------------------------


@rule(aten.convolution, any_input=True)
def convolution(t: "Tracer", call: OpCall) -> Optional[bool]:
    x, weight, bias, out = call["input"], call["weight"], call["bias"], call.out
    transposed, groups = call["transposed"], call["groups"]
    name, bias_name = t.name_of(weight), t.name_of(bias)
    space = t.channels(x) or t.frozen_space(x, f"{call.func} input of unknown origin")
    if name is None or t.tensors[name].shape != weight.shape or bias is not None and bias_name is None:
        return t.unknown([x], f"{call.func} with a weight or bias that is not one of the "
                              "model's parameters or buffers")
    if space.dim != 1:
        return t.unknown([x], f"{call.func} reads dim 1, the channels are in dim {space.dim}")
    in_channels, out_channels = x.shape[1], out.shape[1]
    # Every weight element is one multiply-add (2 FLOPs) per position of the output (of the
    # input, for a transposed conv) in every sample: the count torch.utils.flop_counter gives.
    positions = (x if transposed else out).shape[2:].numel() * out.shape[0]
    t.flops_per_weight[name] = t.flops_per_weight.get(name, 0) + 2 * positions
    functional = not isinstance(t.module(), torch.nn.modules.conv._ConvNd)
    if groups == 1:
        t.read(x)
        t.add_slots(space, name, 0 if transposed else 1)
        group = t.groups.new(out_channels)
        t.add_slots(Space(1, [group]), name, 1 if transposed else 0)
        if bias_name:
            t.add_slots(Space(1, [group]), bias_name, 0)
        t.propose(out, Space(1, [group]))
    elif groups == in_channels == out_channels:  # depthwise: per channel
        # F.conv2d(x, self.filt, groups=self.channels) (timm's BlurPool2d): the count is set;
        # one computed from x's shape needs nothing, a constant fails the trial prune
        if functional:
            t.bookkeeping(groups, [list(space.groups)])
        t.read(x, per_channel=True)
        t.add_slots(space, name, 0)
        if bias_name:
            t.add_slots(space, bias_name, 0)
        t.propose(out, space)
    else:  # grouped, or depthwise with several outputs per input channel (FastViT)
        local = t.blocks(x, groups, "grouped convolution")
        if local is None:
            return t.unknown([x], f"grouped convolution ({groups} groups) whose input channels "
                                  "do not split into equal conv groups")
        grouped_convolution(t, x, out, groups, local, name, bias_name, transposed)


def grouped_convolution(t: "Tracer", x: torch.Tensor, out: torch.Tensor, groups: int, local: list[int],
                        name: str, bias_name: Optional[str], transposed: bool) -> None:
    """Conv group j reads input channels [j * wi, (j + 1) * wi) and writes output channels
    [j * wo, (j + 1) * wo); every conv group must keep as many channels as the others. So the
    same local channel goes from every conv group: the input's blocks are tied (``local``, the
    groups of one block, Tracer.blocks), and the output is one group of wo channels repeated
    ``groups`` times (ResNeXt, RegNet). The weight holds one block's input channels (all of
    them, transposed) and every output channel (one block's). A depthwise conv with several
    outputs per input channel (FastViT) is one too: its input channels, one per block, are all
    tied into one channel that stays, and its outputs lose the same one of each input's."""
    t.read(x)
    group = t.groups.new(out.shape[1] // groups)
    repeated = Space(1, [group] * groups)
    t.add_slots(t.channels(x) if transposed else Space(1, local), name, 0 if transposed else 1)
    t.add_slots(Space(1, [group]) if transposed else repeated, name, 1 if transposed else 0)
    if bias_name:
        t.add_slots(repeated, bias_name, 0)
    t.propose(out, repeated)


@rule(F.linear, torch._C._nn.linear, any_input=True, params=("input", "weight", "bias"))
def linear(t: "Tracer", call: OpCall) -> Optional[bool]:
    x, weight, bias, out = call["input"], call["weight"], call.get("bias"), call.out
    space, name, bias_name = t.channels(x), t.name_of(weight), t.name_of(bias)
    space = space or t.frozen_space(x, "linear input of unknown origin", dim=-1)
    if name is None or bias is not None and bias_name is None:
        return t.unknown([x], "linear with a weight or bias that is not a parameter")
    if space.dim != x.dim() - 1:
        return t.unknown([x], f"linear reads the last dim, the channels are in dim {space.dim}")
    t.read(x)
    t.add_slots(space, name, 1)
    positions = out.numel() // out.shape[-1]  # 2 FLOPs per weight element at each position
    t.flops_per_weight[name] = t.flops_per_weight.get(name, 0) + 2 * positions
    group = Space(out.dim() - 1, [t.groups.new(out.shape[-1])])
    t.add_slots(group, name, 0)
    if bias_name:
        t.add_slots(group, bias_name, 0)
    t.propose(out, group)


def per_channel_norm(t: "Tracer", x: torch.Tensor, tensors: Sequence[Any], out: torch.Tensor,
                     what: str) -> None:
    """A norm with statistics and parameters per channel of dim 1 (batch or instance norm); a
    torch.nn norm's channel count follows."""
    space = t.channels(x)
    names = [t.name_of(v) for v in tensors if v is not None]
    if space is None:
        return
    if None in names or space.dim != 1:
        return t.unknown([x], f"{what} with tensors that are not the model's, or channels "
                              "outside dim 1")
    t.read(x, per_channel=True)
    for name in names:
        t.add_slots(space, name, 0)
    if isinstance(t.module(), torch.nn.modules.batchnorm._NormBase):
        t.bookkeeping(x.shape[1], [list(space.groups)], name="num_features")
    t.propose(out, space)


@rule(aten.native_batch_norm, aten._native_batch_norm_legit_no_training,
      aten._native_batch_norm_legit, aten.cudnn_batch_norm)
def batch_norm(t: "Tracer", call: OpCall) -> Optional[bool]:
    tensors = [call.get(n) for n in ("weight", "bias", "running_mean", "running_var")]
    per_channel_norm(t, call.x, tensors, call.first, str(call.func))


@rule(F.instance_norm, params=("input", "running_mean", "running_var", "weight", "bias"))
def instance_norm(t: "Tracer", call: OpCall) -> Optional[bool]:
    tensors = [call.get(n) for n in ("running_mean", "running_var", "weight", "bias")]
    per_channel_norm(t, call["input"], tensors, call.out, "instance norm")


@rule(aten.native_group_norm)
def group_norm(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Removing every channel of a norm group leaves the other groups' statistics as they
    were: the channels go in whole norm groups (``num_groups`` shrinks, the group size stays).
    Where norm groups cut channel groups (or there is one), removing part of one changes the
    rest: frozen, or with mixing_norms="prune" pruned inside the norm groups, the same local
    channels from each so that they stay equal."""
    x, groups = call.x, call["group"]
    space, width = t.channels(x), x.shape[1] // groups
    if space is None or space.dim != 1:
        return t.unknown([x], "group norm of channels outside dim 1")
    whole = width == 1 or groups > 1 and t.units(x, width, "group norm")
    if not whole:
        what = f"group norm of {width} channels per group" + (", whose groups cut channel groups"
                                                              if groups > 1 else "")
        if not t.mixing(x, what):
            return
        if t.blocks(x, groups, "group norm") is None:
            return t.unknown([x], what + " that group norm units forbid splitting")
        space = t.channels(x)
    pieces = [list(space.groups)]
    if isinstance(t.module(), torch.nn.GroupNorm):  # its counts are set
        counted = t.bookkeeping(x.shape[1], pieces, name="num_channels") and \
            (not whole or t.bookkeeping(groups, pieces, width, name="num_groups"))
    else:  # a functional call's group count must be an attribute of the module calling it
        counted = not whole or t.bookkeeping(groups, pieces, width)
    if not counted:
        return t.unknown([x], f"group norm whose group count {groups} is not an attribute of "
                              "the module calling it")
    per_channel_norm(t, x, [call["weight"], call["bias"]], call.first, str(call.func))


@rule(aten.native_layer_norm)
def layer_norm(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Normalizing other dims than the channels (per position), the weights are not the
    channels'. Normalizing the channels (ConvNeXt's, a transformer's) mixes them: frozen, or
    with mixing_norms="prune" pruned with the weights, torch.nn.LayerNorm's shape following."""
    x, space, shape = call.x, t.channels(call.x), list(call["normalized_shape"])
    first = x.dim() - len(shape)
    if space is None:
        return
    if space.dim < first:
        t.read(x)  # its weights are per position, not per channel
        return t.propose(call.first, space)
    names = [t.name_of(v) for v in (call["weight"], call["bias"]) if v is not None]
    if not t.mixing(x, "layer norm normalizes across channels"):
        return
    # torch.nn.LayerNorm's shape is set; a functional call's is taken as computed from the
    # input (MONAI's F.layer_norm(x, [ch])), the trial prune freezing what it is not
    if isinstance(t.module(), torch.nn.LayerNorm):
        t.bookkeeping(shape, [list(space.groups)], name="normalized_shape")
    elif not t.bookkeeping(shape, [list(space.groups)]):
        t.bookkeeping(shape[0], [list(space.groups)])
    if len(shape) != 1 or None in names:
        return t.unknown([x], "layer norm over channels and other dims, or with weights that "
                              "are not the model's")
    t.read(x, per_channel=True)
    for name in names:
        t.add_slots(space, name, 0)
    t.propose(call.first, space)


# -- element-wise and spatial ops --------------------------------------------------------------


def _same_shape(t: "Tracer", call: OpCall) -> bool:
    return isinstance(call.first, torch.Tensor) and t.channels(call.x) is not None and \
        call.first.shape == call.x.shape


@rule(aten.relu, aten.relu_, aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.hardtanh,
      aten.hardtanh_, aten.hardswish, aten.hardswish_, aten.leaky_relu, aten.leaky_relu_, aten.elu,
      aten.elu_, aten.celu, aten.celu_, aten.selu, aten.selu_, aten.mish, aten.mish_, aten.tanh,
      aten.tanh_, aten.abs, aten.neg, aten.erf, aten.sqrt, aten.softshrink, aten.hardshrink,
      aten.clone, aten.detach, aten.alias, aten._to_copy, aten.dropout, aten.native_dropout)
def zero_keeping(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Element-wise ops that map zero to zero: the output keeps the input's space and gates."""
    if not _same_shape(t, call):
        return False
    t.follow(call.first, call.x)


@rule(aten._prelu_kernel)
def prelu(t: "Tracer", call: OpCall) -> Optional[bool]:
    """PReLU maps zero to zero, so its output keeps the input's gates; a weight per channel
    (``nn.PReLU(channels)``) is a slot of their groups, a single one (MONAI's default) stays."""
    x, weight = call.x, call["weight"]
    if not _same_shape(t, call):
        return False
    space, dim = t.channels(x), per_channel_operand(t, weight, x)
    if dim is False:
        return t.unknown([x], f"{call.func} with a per-channel weight that is not traced")
    if dim is not None:
        t.add_slots(space, t.name_of(weight), dim)
        if isinstance(t.module(), torch.nn.PReLU):
            t.bookkeeping(x.shape[space.dim], [list(space.groups)], name="num_parameters")
    t.follow(call.first, x)


@rule(aten.addcmul)
def addcmul(t: "Tracer", call: OpCall) -> Optional[bool]:
    """``base + value * a * b`` with one activation and per-channel (or constant) others: an
    affine map per channel (timm's GlobalResponseNorm: ``addcmul(bias, weight, x)``)."""
    base, a, b = call.x, call["tensor1"], call["tensor2"]
    traced = [v for v in (base, a, b) if t.channels(v) is not None]
    if len(traced) != 1 or traced[0] is base or call.first.shape != traced[0].shape:
        return False
    x, others = traced[0], (b if traced[0] is a else a, base)
    space, dims = t.channels(x), [per_channel_operand(t, v, x) for v in others]
    if any(dim is False for dim in dims):
        return t.unknown([x], f"{call.func} with a per-channel operand that is not traced")
    for other, dim in zip(others, dims):
        if dim is not None:
            t.add_slots(space, t.name_of(other), dim)
    t.read(x, per_channel=True)
    t.propose(call.first, space)


@rule(aten.sigmoid, aten.sigmoid_, aten.hardsigmoid, aten.hardsigmoid_, aten.exp, aten.exp_,
      aten.clamp, aten.clamp_, aten.clamp_min, aten.softplus, aten.rsub, aten.reciprocal,
      aten.rsqrt, aten.log, aten.pow)
def value_setting(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Element-wise ops that do not keep zeros zero: the output needs a gate of its own."""
    if not _same_shape(t, call):
        return False
    t.read(call.x)
    t.propose(call.first, t.channels(call.x))


@rule(aten._softmax)
def softmax(t: "Tracer", call: OpCall) -> Optional[bool]:
    if not _same_shape(t, call) or call["dim"] % call.x.dim() == t.channels(call.x).dim:
        return False
    t.read(call.x)
    t.propose(call.first, t.channels(call.x))


@rule(aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, aten.avg_pool2d,
      aten.avg_pool3d, aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d,
      aten.adaptive_max_pool2d, aten.adaptive_max_pool3d, aten.upsample_nearest2d,
      aten.upsample_nearest3d, aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d,
      aten.upsample_bilinear2d, aten.upsample_trilinear3d, aten.upsample_bicubic2d,
      aten.reflection_pad2d, aten.reflection_pad3d, aten.replication_pad2d,
      aten.replication_pad3d, aten.constant_pad_nd, aten.roll)
def spatial(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Ops over the dims after the channels (dim 1; for a constant padding or a roll, any dims
    but the channels: Swin's windows on channels-last tokens) that keep zeros zero (a padding
    with another value sets new values)."""
    x, first, space, packet = call.x, call.first, t.channels(call.x), call.func.overloadpacket
    if space is None or first.dim() != x.dim() or first.shape[space.dim] != x.shape[space.dim]:
        return False
    touched: Sequence[int]
    if packet is aten.constant_pad_nd:  # pairs from the last dim backwards
        pad = call["pad"]
        touched = [x.dim() - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]]
    elif packet is aten.roll:
        touched = [d % x.dim() for d in call["dims"]] or range(x.dim())
    else:
        touched = range(2, x.dim())
    if space.dim in touched or packet not in (aten.constant_pad_nd, aten.roll) and space.dim != 1:
        return False
    if packet is aten.constant_pad_nd and call["value"] != 0:
        t.read(x)
        t.propose(first, space)
    else:
        t.follow(first, x)


@rule(aten.empty, aten.zeros, aten.ones, aten.full, aten.randn, aten.rand, aten.arange,
      aten.zeros_like, aten.ones_like, aten.empty_like)
def source(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Ops that create tensors from nothing, or read only shapes: nothing to follow."""


@rule(aten.mean, aten.sum, aten.amax, aten.amin, aten.linalg_vector_norm)
def reduction(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Reductions over other dims than the channels pass the space on. A mean over the
    channels is a norm's statistic (GRN's): see Tracer.mixing."""
    x, out, space = call.x, call.first, t.channels(call.x)
    dims = call.get("dim")
    dims = dims if isinstance(dims, (int, list, tuple)) else ()
    dims = {d % x.dim() for d in ([dims] if isinstance(dims, int) else dims or range(x.dim()))}
    if space is None:
        return False
    if space.dim in dims:
        if call.func.overloadpacket is not aten.mean:
            return False
        if t.mixing(x, "a mean over channels"):
            t.read(x)
        return
    keepdim = out.dim() == x.dim()
    dim = space.dim if keepdim else space.dim - sum(d < space.dim for d in dims)
    t.follow(out, x, Space(dim, space.groups))


# -- views and indexing ------------------------------------------------------------------------


@rule(aten.view, aten._unsafe_view, aten.reshape, aten.expand, aten.unsqueeze, aten.squeeze,
      aten.permute, aten.transpose, aten.t)
def view(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Views and permutes that keep the channel dim whole move it. A view that splits it into
    blocks (heads, a selective kernel's paths) keeps the same local channels in every block
    (Tracer.blocks), the channels in the last dim of the split; one that joins blocks back
    into one dim repeats the groups. Others are not followed."""
    x, out, space, packet = call.x, call.first, t.channels(call.x), call.func.overloadpacket
    if space is None:
        return False
    if packet in (aten.permute, aten.transpose, aten.t):
        order = list(range(x.dim()))
        if packet is aten.t:
            order.reverse()
        elif packet is aten.transpose:
            a, b = call["dim0"] % x.dim(), call["dim1"] % x.dim()
            order[a], order[b] = order[b], order[a]
        else:
            order = [d % x.dim() for d in call["dims"]]
        return t.follow(out, x, Space(order.index(space.dim), space.groups))
    if packet is aten.expand:  # aligned from the right
        return t.follow(out, x, Space(space.dim + out.dim() - x.dim(), space.groups))
    # same elements in the same order: a dim of out holding the elements from the same start
    c, channels = space.dim, x.shape[space.dim]

    def starts(before: int) -> list[int]:
        return [d for d in range(out.dim()) if out.shape[:d].numel() == before]

    kept = [d for d in starts(x.shape[:c].numel()) if out.shape[d] == channels]
    if kept:
        return t.follow(out, x, Space(kept[0], space.groups))
    if packet is aten.unsqueeze or packet is aten.squeeze:
        return False
    for d in starts(x.shape[:c].numel()):  # split: channels become dims d..e of out
        e = next((e for e in range(d + 1, out.dim()) if out.shape[d:e + 1].numel() >= channels), None)
        if e is not None and out.shape[d:e + 1].numel() == channels and out.shape[e] < channels:
            local = t.blocks(x, channels // out.shape[e], f"{call.func} into blocks")
            if local is None:
                return False
            # timm's Attention.head_dim is set; a size computed on the way is taken as
            # computed from this tensor's shape (SK's C // self.num_paths), and a trial prune
            # (structure.trial) freezes the channels where that is not so
            t.bookkeeping(out.shape[e], [local])
            return t.follow(out, x, Space(e, local))
    for b in range(c):  # join: dims b..c of x become one dim of out
        joined = x.shape[b:c + 1].numel()
        found = [d for d in starts(x.shape[:b].numel()) if out.shape[d] == joined]
        if found:
            return t.follow(out, x, Space(found[0], space.groups * (joined // channels)))
    return False


@rule(aten.select, aten.slice, aten.split, aten.split_with_sizes, aten.unbind)
def index(t: "Tracer", call: OpCall) -> Optional[bool]:
    """select, slice, split, unbind: across other dims the space passes. Along the channels,
    groups are cut at the pieces' bounds. Split sizes the running module holds (timm's
    MixedConv2d ``self.splits``, or the total they come from: SK's ``self.in_channels //
    self.num_paths``) are set by the surgery; others are taken as computed from the input's
    shape (torch.chunk's), equal pieces tied so that they stay equal, and the trial prune
    (structure.trial) freezes what that does not hold for. A slice's bounds must be attributes
    (a constant bound would silently take other channels), unless it takes the whole dim."""
    x, space, packet = call.x, t.channels(call.x), call.func.overloadpacket
    if space is None:
        return False
    dim = call.get("dim", 0) % x.dim()
    pieces = list(call.out) if isinstance(call.out, (tuple, list)) else [call.out]
    if dim != space.dim:
        if packet in (aten.select, aten.unbind):
            new = Space(space.dim - (dim < space.dim), space.groups)
        else:
            new = space
        for piece in pieces:
            t.follow(piece, x, new)
        return
    if packet in (aten.select, aten.unbind) or packet is aten.slice and call["step"] != 1:
        return False  # channels by index: the indices would not follow a prune
    total, sizes = x.shape[dim], [p.shape[dim] for p in pieces]
    start = slice(call["start"], call["end"]).indices(total)[0] if packet is aten.slice else 0
    if sizes == [total]:
        return t.follow(pieces[0], x)  # the whole dim (GhostNet's out[:, :self.out_chs])
    if packet is aten.split:  # pieces of one size (an uneven last one could not stay so)
        local = t.blocks(x, len(sizes), f"{call.func} into equal pieces")
        if len(set(sizes)) != 1 or local is None:
            return False
        t.bookkeeping(sizes[0], [local]) or t.bookkeeping(total, [list(t.channels(x).groups)])
        for piece in pieces:
            t.follow(piece, x, Space(dim, local))
        return
    bounds = [start + sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if not t.cut_at(x, bounds):
        return False
    groups, offsets = t.channels(x).groups, t.boundaries(x)
    held = [groups[offsets.index(a):offsets.index(b)] for a, b in zip(bounds, bounds[1:])]
    if packet is aten.slice:
        if not all(t.bookkeeping(b, [groups[:offsets.index(b)]]) for b in bounds if 0 < b < total):
            return t.unknown([x], f"{call.func} of channels [{bounds[0]}, {bounds[1]}), bounds that "
                                  "are not attributes of the module calling it")
    elif not t.bookkeeping(sizes, held):
        for n, h in zip(sizes, held):
            t.bookkeeping(n, [h])
    for piece, h in zip(pieces, held):
        t.follow(piece, x, Space(dim, h))


# -- several activations -----------------------------------------------------------------------


def per_channel_operand(t: "Tracer", other: Any, like: torch.Tensor) -> Union[int, None, bool]:
    """The Slot dim of a parameter or buffer ``other`` that holds one value per channel of the
    activation ``like`` when broadcast against it; None if it is constant along them, False if
    it varies in a way the rules do not follow."""
    space = t.channels(like)
    if not isinstance(other, torch.Tensor):
        return None
    i = space.dim - (like.dim() - other.dim())  # other's dim that lines up with like's channels
    if not 0 <= i < other.dim() or other.shape[i] == 1:
        return None
    name = t.name_of(other)
    if name is None or other.numel() != other.shape[i]:
        return False
    param = t.tensors[name]
    dims = [d for d, n in enumerate(param.shape) if n != 1]
    return dims[0] if len(dims) == 1 and param.shape[dims[0]] == other.shape[i] else False


@rule(aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_)
def elementwise(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Two activations: their groups are tied (a residual sum, an attention product). One
    activation and a per-channel parameter: a layer scale or a bias, slots of its groups."""
    a, b, out, func = call.x, call.get("other"), call.first, call.func
    sa, sb = t.channels(a), t.channels(b)
    packet = func.overloadpacket
    product = packet in (aten.mul, aten.mul_, aten.div, aten.div_)
    if sa is not None and sb is not None:
        if a.dim() - sa.dim != b.dim() - sb.dim or a.shape[sa.dim] != b.shape[sb.dim]:
            if b.dim() - sa.dim > 0 and b.shape[b.dim() - (a.dim() - sa.dim)] == 1:
                sb = None  # b is broadcast along a's channels (a spatial attention map)
            elif a.dim() - sb.dim > 0 and a.shape[a.dim() - (b.dim() - sb.dim)] == 1:
                sa = None
            else:
                return t.unknown([a, b], f"{func} of channels that do not line up")
    if sa is not None and sb is not None:
        # SE over a concatenation (GhostNet), over a grouped conv's blocks (RegNetY): the
        # groups are cut to line up, then tied
        if not t.align([a, b], str(func)):
            return t.unknown([a, b], f"{func} of channels whose group norm units do not line up")
        sa = t.channels(a)
        oa, ob = t.origin_of(a), t.origin_of(b)
        if packet in (aten.div, aten.div_):
            t.read(b)
        origin = {}
        for g in sa.groups:
            g = t.groups.find(g)
            if product:  # zero when a is zero
                origin[g] = oa.get(g) or (ob.get(g) if packet in (aten.mul, aten.mul_) else None)
            elif g in oa and g in ob:  # a sum is zero when both are
                origin[g] = oa[g] | ob[g]
        t.set_space(out, Space(out.dim() - (a.dim() - sa.dim), sa.groups),
                    {g: p for g, p in origin.items() if p})
        return
    x, other = (a, b) if sa is not None else (b, a)
    space = t.channels(x)
    if x is b and packet in (aten.div, aten.div_, aten.sub, aten.sub_):
        return t.unknown([x], f"{func} with the activation as second operand")
    dim = per_channel_operand(t, other, x)
    if dim is False:
        return t.unknown([x], f"{func} with a per-channel operand that is not traced")
    new = Space(out.dim() - (x.dim() - space.dim), space.groups)
    if dim is not None:  # a per-channel parameter: a layer scale, or a bias
        t.add_slots(space, t.name_of(other), dim)
    if product:  # zero stays zero
        t.follow(out, x, new)
    else:
        t.read(x, per_channel=True)
        t.propose(out, new)


@rule(aten.bmm, aten.mm)
def matmul(t: "Tracer", call: OpCall) -> Optional[bool]:
    """``a @ b``. Channels along the contracted dim of both (an attention's ``q @ k^T``) are
    tied and read; channels along a dim of one that the output keeps (the rows of a, the columns
    of b: ``attention @ v``) pass on when the other holds none."""
    a, b, out = call.x, call["mat2"], call.first
    sa, sb = t.channels(a), t.channels(b)
    if sa is not None and sb is not None:
        if sa.dim != a.dim() - 1 or sb.dim != b.dim() - 2 or not t.align([a, b], str(call.func)):
            return False
        t.read(a)
        t.read(b)
        return
    x, kept = (a, a.dim() - 2) if sa is not None else (b, b.dim() - 1)
    if t.channels(x).dim != kept:
        return False
    t.follow(out, x)


@rule(aten.cat, aten.stack)
def join(t: "Tracer", call: OpCall) -> Optional[bool]:
    """Concatenation along the channels joins spaces (U-Net skips); stacking, or concatenating
    along another dim, puts the inputs' channels in one dim: their groups are tied. A group
    found in several inputs (GhostNet's ``cat([x1, cheap(x1)])``, DLA's ``cat([f(x) + x, x])``)
    is zeroed in the output only when it is zeroed in every one of them: it keeps every input's
    gates."""
    tensors, out, func = call["tensors"], call.first, call.func
    spaces = [t.channels(x) or t.frozen_space(x, f"{func} input of unknown origin") for x in tensors]
    dims = {x.dim() - s.dim for x, s in zip(tensors, spaces)}  # channel dims from the right
    if len(dims) != 1:
        return t.unknown(tensors, f"{func} of tensors with channels in different dims")
    channel_dim = out.dim() - dims.pop()
    if func.overloadpacket is aten.cat and call["dim"] % out.dim() == channel_dim:
        space = Space(channel_dim, [g for s in spaces for g in s.groups])
    else:
        if len({x.shape[x.dim() - d] for x in tensors for d in [out.dim() - channel_dim]}) > 1 or \
                not t.align(tensors, str(func)):
            return t.unknown(tensors, f"{func} of channels that do not line up")
        space = Space(channel_dim, t.channels(tensors[0]).groups)
    t.set_space(out, space, t.merged_origin(tensors))
