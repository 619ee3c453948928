"""Which channels of a model must be removed together: channel groups, found by tracing.

A forward pass on an example input is recorded at the dispatcher, where every aten op the model
actually executes passes, Python control flow already resolved (torch.fx would stop at it, and the
autograd graph hides ops that do not need gradients). Functions whose aten pieces lose their
meaning (F.linear, F.instance_norm) are caught whole one level up, by a TorchFunctionMode.

Every activation gets a *channel space*: the dim that holds its channels, and the list of groups
whose channels make up that dim, in order. What each op does to spaces is an op *rule*
(polyprune_ext.structure.rules): convs and linear layers start groups, norms and per-channel
parameters add slots, adds tie groups, concatenations join spaces, views move the channel dim.
Users add rules for their own ops or functions with ``@rule`` or ``analyze(..., rules=...)``.

Never guess: an op with no rule, or a rule's precondition not met, freezes every group it
touches, and the report says which op, in which module, and why. The model's inputs and outputs
are frozen too (the image channels and the classes are fixed), and so are the channels of
ignored modules. Counts the forward pass takes from its modules (split sizes, head sizes) are
module attributes the surgery sets (Analysis.attributes); a trial prune on the meta device
(structure.trial) then freezes the groups whose removal would still break the forward pass.

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
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .. import choices
from .._inputs import check_materialized
from ..choices import MixingNorms
from .rules import RULES, OpCall, Rule, bind
from .spaces import Attribute, ChannelGroup, Gate, Groups, Proposal, Slot, Space
from .stats import forward_once
from .trial import freeze_breaking

# What a proposal set maps to, per group: (proposal, already gated on the way) pairs.
Origin = dict[int, frozenset]


class Tracer(TorchDispatchMode):
    """The analysis state during the traced forward pass, and the primitives rules use.

    Rules (polyprune_ext.structure.rules) call these methods: ``channels`` to see where a tensor
    holds its channels, ``follow`` to pass them on unchanged, ``propose`` for an op that sets new
    channel values, ``read`` for an op that consumes them, ``add_slots`` and ``groups.new`` for
    the tensors of a layer, ``unknown`` to freeze what cannot be followed."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], rules: Mapping[Any, Rule],
                 modules: Mapping[str, torch.nn.Module], mixing_norms: MixingNorms = "freeze"):
        super().__init__()
        self.tensors = tensors  # parameter or buffer name -> tensor
        self.modules = modules  # name -> module, "" the model
        self.mixing_norms = mixing_norms
        self.rules = rules
        self.names = {t.untyped_storage().data_ptr(): n for n, t in tensors.items() if t.numel()}
        self.groups = Groups()
        self.space: dict[int, Space] = {}  # id(tensor) -> Space
        # id(tensor) -> {group id: proposals whose gates, zeroed, zero the group's channels in
        # the tensor}. A group missing from the dict has no such guarantee there.
        self.origin: dict[int, Origin] = {}
        self.flops_per_weight: dict[str, int] = {}  # conv/linear weight name -> FLOPs per element
        self.alive: list[torch.Tensor] = []  # keeps traced tensors alive so their ids stay unique
        self.stack: list[str] = []  # names of the modules being run, outermost first
        self.returned: dict[int, list[Proposal]] = {}  # id(module output) -> proposals gated there
        self.paused = False  # inside a function or module whose rule sees it whole
        # Module attributes holding channel counts: (module, name, pieces of group ids, per,
        # listed), made Attribute records at the end.
        self.attributes: list[tuple[str, str, list[list[int]], int, bool]] = []

    # -- spaces and gates ------------------------------------------------------------------------

    def channels(self, t: Any) -> Optional[Space]:
        return self.space.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set_space(self, t: Any, space: Space, origin: Optional[Origin] = None) -> None:
        """Give t a space; ``origin`` maps groups to the proposals that gate them in t."""
        if isinstance(t, torch.Tensor):
            self.space[id(t)] = space
            self.origin[id(t)] = self.listed(space, origin or {})
            self.alive.append(t)

    def listed(self, space: Space, origin: Origin) -> Origin:
        """``origin`` keyed by the group ids ``space`` lists (groups tied since keep their own
        entries: see origin_of)."""
        roots: dict[int, frozenset] = {}
        for g, proposals in origin.items():
            roots[self.groups.find(g)] = roots.get(self.groups.find(g), frozenset()) | proposals
        return {g: roots[self.groups.find(g)] for g in space.groups if self.groups.find(g) in roots}

    def follow(self, out: Any, x: torch.Tensor, space: Optional[Space] = None) -> None:
        """``out`` holds ``x``'s channels with the same values (zeros stay zeros), in ``space``
        (default: x's own)."""
        self.set_space(out, space or self.space[id(x)], self.origin_of(x))

    def origin_of(self, t: torch.Tensor) -> Origin:
        """{group: proposals} of t by root. Groups tied after t was made are zeroed in t only
        where each of them was, by all of their proposals together."""
        stored, space = self.origin.get(id(t), {}), self.space.get(id(t), Space(0, []))
        merged: Origin = {}
        missing = set()
        for g in space.groups:
            root = self.groups.find(g)
            if g in stored:
                merged[root] = merged.get(root, frozenset()) | stored[g]
            else:
                missing.add(root)
        return {g: p for g, p in merged.items() if g not in missing}

    def merged_origin(self, tensors: Iterable[torch.Tensor]) -> Origin:
        """The origin of a tensor made of the channels of ``tensors`` (a concatenation, a
        stack): a group is zeroed in it where it is zeroed in each of them that holds it, so it
        takes all of their proposals."""
        merged: Origin = {}
        missing = set()
        for x in tensors:
            origin = self.origin_of(x)
            for g in self.space[id(x)].groups:
                root = self.groups.find(g)
                if root in origin:
                    merged[root] = merged.get(root, frozenset()) | origin[root]
                else:
                    missing.add(root)
        return {g: p for g, p in merged.items() if g not in missing}

    def propose(self, out: Any, space: Space) -> None:
        """The op making ``out`` set the values of its channels: a new gate is proposed there,
        one per group (each group keeps, or drops, its own)."""
        self.set_space(out, space, {g: frozenset([(Proposal(), False)]) for g in space.groups})

    def read(self, t: Any, per_channel: bool = False) -> None:
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

    def module_output(self, name: str, out: torch.Tensor) -> None:
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
                proposals = frozenset([(Proposal(), False)])
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
        self.origin[id(out)] = self.listed(space, origin)

    def where(self) -> str:
        return f" in {self.stack[-1]}" if self.stack else ""

    def module(self) -> torch.nn.Module:
        """The module whose forward is running the op (the model outside every submodule)."""
        return self.modules[self.stack[-1] if self.stack else ""]

    def mixing(self, t: torch.Tensor, what: str) -> bool:
        """A norm's statistics run over t's channels, so removing one changes the others. With
        mixing_norms="prune" they stay prunable, the module named in their groups (the pruned
        model's statistics then run over the channels kept); else they freeze."""
        if self.mixing_norms != "prune":
            self.unknown([t], f"{what}: removing one would change the others")
            return False
        module = self.stack[-1] if self.stack else "(the model)"
        for g in self.space[id(t)].groups:
            if module not in self.groups.get(g).mixing:
                self.groups.get(g).mixing.append(module)
        return True

    def held(self, value: Union[int, Sequence[int]]) -> list[str]:
        """The attributes of the running module that hold ``value``: an int, or a list or tuple
        of ints equal to it."""
        def holds(held: Any) -> bool:
            if isinstance(value, int):
                return type(held) is int and held == value
            return isinstance(held, (list, tuple)) and list(held) == list(value)
        return [a for a, held in vars(self.module()).items() if holds(held)]

    def bookkeeping(self, value: Union[int, Sequence[int]], pieces: list[list[int]], per: int = 1,
                    name: Optional[str] = None) -> bool:
        """Whether the running module holds ``value``, the channel counts of ``pieces`` (lists of
        groups) over ``per``, in an attribute (``name``, when given): an int for one piece, a
        list or tuple for several. If so, the surgery will set every such attribute after a
        prune. A count the module computes on the way (``self.c // 2``) is not found."""
        found = [a for a in self.held(value) if a == name or name is None]
        module = self.stack[-1] if self.stack else ""
        for a in found:
            self.attributes.append((module, a, pieces, per, not isinstance(value, int)))
        return bool(found)

    def unknown(self, inputs: Iterable[Any], why: str) -> None:
        """Freeze what an op touches. Its outputs are not followed: where their channels are is
        unknown, and a layer that reads them sees an input of unknown origin."""
        why += self.where()
        for t in inputs:
            space = self.channels(t)
            if space is not None:
                self.groups.freeze(space.groups, why)

    def frozen_space(self, t: Any, why: str, dim: int = 1) -> Optional[Space]:
        """The channels, in ``dim``, of a tensor the rules cannot follow: one frozen group."""
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            dim %= t.dim()
            self.set_space(t, Space(dim, [self.groups.new(t.shape[dim], frozen=why)]))
        return self.channels(t)

    def name_of(self, t: Any) -> Optional[str]:
        """The parameter or buffer name of ``t`` (a view of it too), or None."""
        return self.names.get(t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) else None

    def add_slots(self, space: Space, name: str, dim: int) -> None:
        """Dim ``dim`` of tensor ``name`` holds the channels of ``space``, in its order."""
        offset = 0
        for g in space.groups:
            self.groups.get(g).slots.append(Slot(name, dim, offset))
            offset += self.groups.get(g).size

    def cut(self, g: int, sizes: Sequence[int]) -> list[int]:
        """Group g becomes groups of ``sizes`` channels, its channels in order: slots and
        proposed gates are cut at the same offsets (each piece with its own proposals), and every
        space, origin and attribute listing g lists the pieces instead. Returns their ids.
        Channels do not change, only how they may be counted: every piece is still removed
        exactly where its channels were (ties made later keep what must stay equal)."""
        root = self.groups.find(g)
        group = self.groups.groups[root]
        if len(sizes) == 1:
            return [root]
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        pieces = [root] + [self.groups.new(n) for n in sizes[1:]]
        copies: list[dict[Proposal, Proposal]] = [{} for _ in sizes]

        def copy(j: int, p: Proposal) -> Proposal:
            return p if j == 0 else copies[j].setdefault(p, dataclasses.replace(p))

        slots, proposed = group.slots, group.proposed
        for j, (piece, offset, size) in enumerate(zip(pieces, offsets, sizes)):
            new = self.groups.groups[piece]
            new.size, new.unit = size, group.unit
            new.frozen, new.mixing = list(group.frozen), list(group.mixing)
            new.slots = [dataclasses.replace(s, offset=s.offset + offset) for s in slots]
            new.proposed = [(dataclasses.replace(gate, offset=gate.offset + offset), copy(j, p))
                            for gate, p in proposed]
        for key, space in self.space.items():
            listed = list(dict.fromkeys(h for h in space.groups if self.groups.find(h) == root))
            if not listed:
                continue
            stored = self.origin.get(key, {})
            entries = [stored.pop(h) for h in listed if h in stored]
            if len(entries) == len(listed):
                for j, piece in enumerate(pieces):
                    stored[piece] = frozenset((copy(j, p), gated) for e in entries for p, gated in e)
            self.space[key] = Space(space.dim, self.replaced(space.groups, root, pieces))
        for attribute in self.attributes:
            attribute[2][:] = [self.replaced(piece, root, pieces) for piece in attribute[2]]
        for returned in self.returned.values():
            returned += [c[p] for c in copies for p in returned if p in c]
        return pieces

    def replaced(self, groups: list[int], root: int, pieces: list[int]) -> list[int]:
        return [p for h in groups for p in (pieces if self.groups.find(h) == root else [h])]

    def cut_at(self, t: torch.Tensor, offsets: Iterable[int]) -> bool:
        """Cut the groups of t's space so that each of ``offsets`` is a boundary between two
        of them; False where a cut would split a run of a group's unit (the cuts made before
        stay: a cut changes no channel, only how they may be counted)."""
        wanted = set(offsets)
        while True:
            space, start = self.space[id(t)], 0
            for g in space.groups:
                group = self.groups.get(g)
                inner = sorted(o - start for o in wanted if start < o < start + group.size)
                if inner:
                    if any(o % group.unit for o in inner):
                        return False
                    bounds = [0, *inner, group.size]
                    self.cut(g, [b - a for a, b in zip(bounds, bounds[1:])])
                    break
                start += group.size
            else:
                return True

    def boundaries(self, t: torch.Tensor) -> list[int]:
        sizes = self.groups.sizes(self.space[id(t)].groups)
        return [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def units(self, t: torch.Tensor, width: int, why: str) -> bool:
        """t's channels go only in aligned runs of ``width`` (whole groups of a group norm, whose
        removal leaves the other groups' statistics as they were): every group of its space
        starts and ends on a run boundary, and removes whole runs. False, changing nothing,
        where a group starts or ends inside a run."""
        if any(o % width for o in self.boundaries(t)):
            return False
        for g in self.space[id(t)].groups:
            self.groups.set_unit(g, width, why + self.where())
        return True

    def align(self, tensors: Sequence[torch.Tensor], why: str) -> bool:
        """Tie the channels of ``tensors`` position by position (a sum, a product, a stack):
        groups are cut where another tensor has a boundary, then tied pairwise. False where
        a unit forbids a cut."""
        while len({tuple(self.groups.sizes(self.space[id(x)].groups)) for x in tensors}) > 1:
            offsets = {o for x in tensors for o in self.boundaries(x)}
            if not all(self.cut_at(x, offsets) for x in tensors):
                return False
        first = self.space[id(tensors[0])].groups
        for x in tensors[1:]:
            for a, b in zip(first, self.space[id(x)].groups):
                self.groups.tie(a, b, why)
        return True

    def blocks(self, t: torch.Tensor, blocks: int, why: str) -> Optional[list[int]]:
        """Split t's channels into ``blocks`` equal blocks that must keep the same channels (the
        conv groups of a grouped conv, the heads of a view, the pieces of a chunk): groups are
        cut at every boundary any block has, then block j is tied to block 0, so that channel k
        of a group stands for local channel k of every block. Returns block 0's groups, or None
        (nothing tied) where the channels do not divide or a unit forbids a cut."""
        total = sum(self.groups.sizes(self.space[id(t)].groups))
        width = total // blocks
        if width * blocks != total:
            return None
        while True:
            relative = {o % width for o in self.boundaries(t)}
            offsets = {j * width + r for j in range(blocks) for r in relative}
            if not self.cut_at(t, offsets):
                return None
            if {o % width for o in self.boundaries(t)} == relative:
                break
        groups = self.space[id(t)].groups
        per_block = len(groups) // blocks
        for j in range(1, blocks):
            for a, b in zip(groups[:per_block], groups[j * per_block:(j + 1) * per_block]):
                self.groups.tie(a, b, why)
        return groups[:per_block]

    # -- dispatch --------------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        packet = func.overloadpacket
        found = self.rules.get(packet)
        inputs = [t for t in tree_leaves((args, kwargs)) if self.channels(t) is not None]
        if not inputs and not (found and found.any_input):
            return out
        call = OpCall(func, bind(func, args, kwargs), out)
        first = call.first
        if first is call.x and packet not in (torch.ops.aten.relu_, torch.ops.aten.hardtanh_):
            for proposal in self.returned.get(id(call.x), ()):  # changed in place
                proposal.changed_in_place = True
        if found is None or found(self, call) is False:
            self.unknown(inputs, f"{func} is not understood")
        return out

    def apply_whole(self, key: Any, func: Callable, args: Any, kwargs: dict[str, Any],
                    out: Any) -> None:
        """The rule of ``key`` (a torch function, or a module class) for one call of ``func`` (the
        function, or the module's bound forward) that ran untraced; its arguments bound by the
        signature, ``call.func`` the function or the module."""
        found = self.rules[key]
        inputs = [t for t in tree_leaves((args, kwargs)) if self.channels(t) is not None]
        if inputs or found.any_input:
            call = OpCall(getattr(func, "__self__", func) if isinstance(key, type) else func,
                          bind(func, args, kwargs, found.params), out)
            if found(self, call) is False:
                self.unknown(inputs, f"{getattr(key, '__name__', key)} is not understood")


class _Functions(TorchFunctionMode):
    """Runs the rules written for torch functions (F.linear, F.instance_norm): the function runs
    untraced, then its rule sees it as one op. (Functions that do not dispatch through
    __torch_function__, such as plain Python ones, never reach a mode: give rules to the module
    or custom op that holds them.)"""

    def __init__(self, tracer: Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        found = self.tracer.rules.get(func)
        if found is None or self.tracer.paused:
            return func(*args, **kwargs)
        self.tracer.paused = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.tracer.paused = False
        self.tracer.apply_whole(func, func, args, kwargs, out)
        return out


@dataclasses.dataclass
class Analysis:
    """The channel groups of a model (prunable and frozen), the shapes of its parameters and
    buffers, the conv and linear FLOPs per weight element on the example input (for
    policy.cost; a weight may be a buffer, as in timm's BlurPool2d), and the module attributes
    holding channel counts that the surgery sets."""

    groups: list[ChannelGroup]
    shapes: dict[str, tuple[int, ...]]  # parameter or buffer name -> shape
    flops_per_weight: dict[str, int]  # conv/linear weight name -> FLOPs per weight element
    attributes: list[Attribute] = dataclasses.field(default_factory=list)
    buffers: frozenset[str] = frozenset()  # the names in shapes that are buffers
    mixing_norms: MixingNorms = "freeze"  # as analyze was asked: a plan replays it so

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def check_prunable(self, i: int) -> None:
        """ValueError, saying why, unless group ``i`` may be pruned."""
        if not self.groups[i].prunable:
            raise ValueError(f"group {i} cannot be pruned: {'; '.join(self.groups[i].frozen)}")

    def report(self) -> str:
        """The frozen groups and why, and the groups pruned through channel-mixing norms, one
        line each."""
        lines = []
        for g in self.groups:
            where = ", ".join(sorted({gate.module for gate in g.gates})) or "(no module output)"
            if g.frozen:
                lines.append(f"{g.size} channels at {where}: {'; '.join(g.frozen)}")
            elif g.mixing:
                lines.append(f"{g.size} channels at {where}: pruned through channel-mixing norms "
                             f"({', '.join(g.mixing)}), whose statistics then run over the "
                             "channels kept")
        return "\n".join(lines)


def default_ignore(model: torch.nn.Module) -> tuple[str, ...]:
    """smp's heads, the segmentation head and the optional classification head, are kept whole,
    also inside a model holding smp models (the nuclei task's two branches)."""
    return tuple(n for n, m in model.named_modules()
                 if n.rpartition(".")[2] in ("segmentation_head", "classification_head"))


def analyze(model: torch.nn.Module, example_input: Any, ignore: Optional[Iterable[str]] = None,
            *, rules: Optional[Mapping[Any, Callable]] = None,
            mixing_norms: MixingNorms = "freeze") -> Analysis:
    """Channel groups of ``model`` from one forward pass on ``example_input`` (a tensor or a tuple
    of positional arguments), run by forward_once. Every activation of that pass is held until
    it ends (their ids name the channel spaces), so a batch of one is enough and cheapest.

    ``ignore``: names of modules whose output channels are kept (their input channels may still
    go when the layers before them are pruned). None means smp's heads (default_ignore).
    ``rules``: rules for this call, over the registered ones ({op, torch function or module
    class: rule}; see polyprune_ext.structure.rules).
    ``mixing_norms``: "freeze" (the default) keeps the channels of norms whose statistics mix
    channels (layer norm over channels, group norm inside a group, GRN's mean over channels);
    "prune" lets them go, the pruned model's statistics then running over the channels kept:
    not function-preserving, so fine-tune after. The report names those norms."""
    check_materialized(model)
    choices.check("mixing_norms", mixing_norms, MixingNorms)
    ignore = default_ignore(model) if ignore is None else tuple(ignore)
    names = {id(m): n for n, m in model.named_modules() if n}
    missing = [n for n in ignore if n not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"ignore names modules the model does not have: {missing}")
    named: dict[str, torch.Tensor] = dict(model.named_parameters())
    named.update(model.named_buffers())
    tracer = Tracer(named, {**RULES, **{op: Rule.of(fn) for op, fn in (rules or {}).items()}},
                    dict(model.named_modules()), mixing_norms)
    for x in tree_leaves(example_input):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            tracer.frozen_space(x, "model input")

    # A module called more than once (torchvision's BasicBlock uses one ReLU twice) cannot be a
    # gate: a hook on it would see every call. A first, untraced pass counts the calls.
    calls: collections.Counter = collections.Counter()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.update([id(module)]))
    try:
        forward_once(model, example_input)
    finally:
        hook.remove()

    whole: list[torch.nn.Module] = []  # the module whose rule sees it whole, while it runs

    def enter(module: torch.nn.Module, args: Any) -> None:
        if id(module) in names:
            tracer.stack.append(names[id(module)])
        if not tracer.paused and type(module) in tracer.rules:
            tracer.paused = True
            whole.append(module)

    def leave(module: torch.nn.Module, args: Any, out: Any) -> None:
        if whole and whole[-1] is module:
            whole.pop()
            tracer.paused = False
            tracer.apply_whole(type(module), module.forward, args, {}, out)
        if id(module) in names:
            name = tracer.stack.pop()
            if not tracer.paused and isinstance(out, torch.Tensor) and calls[id(module)] == 1:
                tracer.module_output(name, out)

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        outputs = forward_once(model, example_input, _Functions(tracer), tracer)
    finally:
        for handle in hooks:
            handle.remove()
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
    analysis = Analysis(tracer.groups.roots(), {n: tuple(t.shape) for n, t in named.items()},
                        tracer.flops_per_weight, attributes(tracer),
                        frozenset(n for n, _ in model.named_buffers()), mixing_norms)
    freeze_breaking(model, example_input, analysis)
    return analysis


def attributes(tracer: Tracer) -> list[Attribute]:
    """The tracer's attribute records with groups as indices into the roots. An attribute that
    counts different channels in two calls of its module cannot be set: their groups freeze."""
    roots = {g: i for i, g in enumerate(g for g in range(len(tracer.groups.groups))
                                        if tracer.groups.parent[g] == g)}
    found: dict[tuple[str, str], set[Attribute]] = collections.defaultdict(set)
    for module, name, pieces, per, listed in tracer.attributes:
        found[(module, name)].add(Attribute(module, name, tuple(
            tuple(roots[tracer.groups.find(g)] for g in piece) for piece in pieces), per, listed))
    groups = tracer.groups.roots()
    for (module, name), records in found.items():
        if len(records) > 1:
            for i in {i for a in records for piece in a.pieces for i in piece}:
                why = f"{module}.{name} counts different channels in different calls"
                if why not in groups[i].frozen:
                    groups[i].frozen.append(why)
    return [a for records in found.values() if len(records) == 1 for a in records]
