"""The data the analysis produces and works on: channel groups, the tensor slots and module
outputs (gates) that belong to them, and the channel space of an activation.

A channel group is a set of channels that must be removed together: channel k of the group is
slice ``offset + k`` of every slot's dim, and zeroing it at every gate equals removing it.
"""

import dataclasses
import math
from typing import NamedTuple, Optional


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


@dataclasses.dataclass(eq=False)
class Proposal:
    """A tensor whose channel values an op has just set: a gate once a module returns it."""

    module: Optional[str] = None  # the module whose output it became
    consumed: bool = False  # read by an op other than a per-channel one
    changed_in_place: bool = False  # after the module returned it (see Gate.copy)


@dataclasses.dataclass(frozen=True)
class Attribute:
    """A module attribute holding channel counts that the forward pass reads (timm's
    MixedConv2d split sizes, BlurPool2d's ``channels``, a group norm's group count): after a
    prune the surgery sets it to the kept channels of each piece's groups (indices into
    Analysis.groups; a group listed twice counts twice) divided by ``per``: an int for one
    piece, a list when ``listed``."""

    module: str
    name: str
    pieces: tuple[tuple[int, ...], ...]
    per: int = 1
    listed: bool = False


@dataclasses.dataclass
class ChannelGroup:
    """``size`` channels removed together: their ``slots`` in parameters and buffers, the
    ``gates`` where they can be observed, and, when they cannot be pruned, why (``frozen``).
    ``unit`` > 1: channels go only in aligned runs of ``unit`` (whole groups of a group norm).
    ``mixing``: the channel-mixing norms they are pruned through (analyze's mixing_norms)."""

    size: int
    slots: list[Slot] = dataclasses.field(default_factory=list)
    gates: list[Gate] = dataclasses.field(default_factory=list)  # zeroed together = removed
    frozen: list[str] = dataclasses.field(default_factory=list)  # why they cannot be pruned
    unit: int = 1
    mixing: list[str] = dataclasses.field(default_factory=list)
    # While tracing: (gate, proposal) pairs, kept as gates if the proposal was consumed.
    proposed: list[tuple[Gate, Proposal]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def prunable(self) -> bool:
        return not self.frozen


class Space(NamedTuple):
    """Where an activation holds its channels: the tensor dim, and the groups along it in order."""

    dim: int
    groups: list[int]


class Groups:
    """Channel groups with union-find: tying two groups makes them one."""

    def __init__(self) -> None:
        self.groups: list[ChannelGroup] = []
        self.parent: list[int] = []

    def new(self, size: int, *, frozen: Optional[str] = None) -> int:
        self.groups.append(ChannelGroup(size, frozen=[frozen] if frozen else []))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def get(self, g: int) -> ChannelGroup:
        return self.groups[self.find(g)]

    def sizes(self, space: list[int]) -> list[int]:
        return [self.get(g).size for g in space]

    def tie(self, a: int, b: int, why: str) -> None:
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
        ga.mixing += [m for m in gb.mixing if m not in ga.mixing]
        self.set_unit(a, gb.unit, why)

    def set_unit(self, g: int, unit: int, why: str) -> None:
        """Group g's channels go only in aligned runs of ``unit`` as well (the least common
        multiple of its units, which divides its size); a group that is one run is frozen."""
        group = self.get(g)
        group.unit = math.lcm(group.unit, unit)
        if group.unit == group.size > 1:
            self.freeze([g], f"{why}: its {group.size} channels go only together")

    def freeze(self, groups: list[int], why: str) -> None:
        for g in groups:
            group = self.get(g)
            if why not in group.frozen:
                group.frozen.append(why)

    def roots(self) -> list[ChannelGroup]:
        return [self.groups[g] for g in range(len(self.groups)) if self.parent[g] == g]
