"""A latency model of a network on the device that will run it, for pruning to a latency budget.

Real-time use is a latency budget, and latency does not follow FLOPs: on a CPU a -50% FLOPs
prune gave 1.12x at batch 1. So the model's latency is predicted from measurements on the
device, at the deployment input size, batch size, dtype and memory format:

- every convolution is timed on its own, at the input size it sees in the network, at a grid of
  input and output widths (fractions of its own; a lookup table, interpolated bilinearly), so
  the cost of any choice of kept channels follows from the widths each conv keeps;
- the whole model is then ``conv_scale`` x the convs' table time plus ``per_activation`` x the
  conv output activations kept, both fitted from whole-model timings of the network and of a copy
  with half of every group's channels. A conv runs slower in the network than alone (its input
  and weights are not in cache: about 1.2x on this CPU, by the profiler), and the norms,
  activations, resizing and concatenations read and write each activation (memory-bound). A
  constant plus the convs' time at face value, the earlier form, put the convs' excess in the
  activation term and under-predicted latency-pruned models (which remove the activation-heavy
  early channels) by 25-38%;
- timings are cached on disk per device, thread count, torch version, dtype, layout and layer
  shape (``~/.cache/polyprune_ext``, or ``$POLYPRUNE_CACHE``): a second run measures nothing new.

``round_to`` is chosen by measurement: the largest of 16, 8, 4, 2 such that rounding a width up
to a multiple of it never costs time on the model's largest convolution (vector units and
tensor cores work in blocks of channels), else 1.
"""

import copy
import dataclasses
import hashlib
import json
import os
import platform
import typing
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .. import _io
from ..speed import compare
from .analysis import Analysis
from .stats import forward_once
from .surgery import prune_

FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125)  # of each conv dim, timed for the lookup table
ConvNd = torch.nn.modules.conv._ConvNd
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
          torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where and how the model will run: what every timing is keyed by."""

    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    dtype: str = "float32"
    channels_last: bool = False

    def key(self) -> str:
        if self.device.startswith("cuda"):
            where = torch.cuda.get_device_name(torch.device(self.device))
        else:
            where = f"{_cpu_name()} x{self.threads} threads"
        return f"{where} | torch {torch.__version__} | {self.dtype} | " + \
            ("channels_last" if self.channels_last else "contiguous")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


@dataclasses.dataclass
class _Conv:
    """A conv of the network: its weight, the input size it sees, and how its widths map to a
    standalone conv."""

    name: str  # weight name
    module: ConvNd
    spatial: tuple[int, ...]  # the input's spatial size in the network
    depthwise: bool

    def signature(self, out_width: int, in_width: int) -> str:
        m = self.module
        return json.dumps([type(m).__name__, out_width, in_width, list(m.kernel_size), list(m.stride),
                           list(m.padding) if not isinstance(m.padding, str) else m.padding,
                           list(m.dilation), m.groups if not self.depthwise else "depthwise",
                           list(self.spatial), m.bias is not None])

    def standalone(self, out_width: int, in_width: int) -> ConvNd:
        """A conv like this one whose weight keeps ``out_width`` x ``in_width`` of dims 0 and 1."""
        m = self.module
        conv = copy.deepcopy(m)
        weight = m.weight.detach()
        shape = list(weight.shape)
        shape[0], shape[1] = out_width, in_width
        conv.weight = torch.nn.Parameter(torch.randn(shape, dtype=weight.dtype, device=weight.device))
        if m.bias is not None:
            outputs = shape[1] if m.transposed else shape[0]
            conv.bias = torch.nn.Parameter(torch.zeros(outputs * (m.groups if m.transposed else 1),
                                                       dtype=weight.dtype, device=weight.device))
        if self.depthwise:
            conv.groups = out_width
        groups = conv.groups
        conv.in_channels = shape[0] if m.transposed else shape[1] * groups
        conv.out_channels = shape[1] * groups if m.transposed else shape[0]
        return conv


def _widths(full: int) -> list[int]:
    return sorted({max(1, round(full * f)) for f in FRACTIONS})


class LatencyModel:
    """Predicted milliseconds of a network after pruning (see the module docstring)."""

    def __init__(self, analysis: Analysis, convs: list[_Conv], tables: dict[str, dict],
                 conv_scale: float, per_activation: float, round_to: int, setting: Setting,
                 measured: int = 0):
        self.analysis, self.convs, self.tables = analysis, convs, tables
        self.conv_scale, self.per_activation = conv_scale, per_activation
        self.round_to, self.setting = round_to, setting
        self.measured = measured  # timings taken to build it (0: all from the cache)

    def rebind(self, analysis: Analysis, model: torch.nn.Module) -> "LatencyModel":
        """The same measurements for ``model`` pruned further since (its new ``analysis``): the
        tables hold absolute widths, and a pruned conv's widths lie inside its table."""
        convs = [dataclasses.replace(c, module=typing.cast(ConvNd, model.get_submodule(c.name.rsplit(".", 1)[0])))
                 for c in self.convs]
        return LatencyModel(analysis, convs, self.tables, self.conv_scale, self.per_activation,
                            self.round_to, self.setting)

    def widths(self, kept: Optional[dict[int, int]] = None) -> dict[tuple[str, int], int]:
        """(weight name, dim) -> its size after keeping ``kept[i]`` channels of group i."""
        kept = kept or {}
        sizes: dict[tuple[str, int], int] = {}
        for i, group in enumerate(self.analysis.groups):
            for slot in group.slots:
                key = (slot.name, slot.dim)
                sizes[key] = sizes.get(key, 0) + kept.get(i, group.size)
        return sizes

    def predict(self, kept: Optional[dict[int, int]] = None) -> float:
        """Milliseconds of one batch after keeping ``kept[i]`` channels of group i."""
        conv_ms, activations = self.conv_terms(kept)
        return self.conv_scale * conv_ms + self.per_activation * activations

    def conv_terms(self, kept: Optional[dict[int, int]] = None) -> tuple[float, float]:
        """(ms of the convs from their tables, conv output activations) after keeping ``kept``."""
        sizes, total, activations = self.widths(kept), 0.0, 0.0
        for conv in self.convs:
            shape = self.analysis.shapes[conv.name]
            out_w, in_w = sizes.get((conv.name, 0), shape[0]), sizes.get((conv.name, 1), shape[1])
            total += _interpolate(self.tables[conv.name], out_w, in_w)
            outputs = in_w * conv.module.groups if conv.module.transposed else out_w
            activations += outputs * torch.Size(conv.spatial).numel()
        return total, activations

    def per_channel(self) -> dict[int, float]:
        """{prunable group: milliseconds saved per channel removed}, from half of the group."""
        full = self.predict()
        return {i: (full - self.predict({i: g.size - g.size // 2})) / max(g.size // 2, 1)
                for i, g in enumerate(self.analysis.groups) if g.prunable}


def _interpolate(table: dict, out_w: int, in_w: int) -> float:
    """Bilinear interpolation in a {"out": [...], "in": [...], "ms": [[...]]} grid; linear
    extrapolation from the two nearest points outside it."""
    def bracket(values: list[int], v: int) -> tuple[int, int, float]:
        j = max(1, min(len(values) - 1, next((k for k, w in enumerate(values) if w >= v), len(values) - 1)))
        lo, hi = values[j - 1], values[j]
        return j - 1, j, (v - lo) / (hi - lo) if hi != lo else 0.0
    if len(table["out"]) == 1 or len(table["in"]) == 1:  # a one-dimensional table
        axis, value = ("out", out_w) if len(table["out"]) > 1 else ("in", in_w)
        row = [r[0] for r in table["ms"]] if axis == "out" else table["ms"][0]
        if len(row) == 1:
            return row[0]
        a, b, t = bracket(table[axis], value)
        return row[a] + t * (row[b] - row[a])
    a, b, t = bracket(table["out"], out_w)
    c, d, u = bracket(table["in"], in_w)
    ms = table["ms"]
    top = ms[a][c] + u * (ms[a][d] - ms[a][c])
    bottom = ms[b][c] + u * (ms[b][d] - ms[b][c])
    return top + t * (bottom - top)


class _Cache:
    """Timings on disk for one setting ({layer signature: ms}, and each network's fitted terms),
    written whole after each new batch."""

    def __init__(self, setting: Setting, directory: Union[str, Path, None]):
        root = Path(directory or os.environ.get("POLYPRUNE_CACHE") or Path.home() / ".cache" / "polyprune_ext")
        digest = hashlib.sha1(setting.key().encode()).hexdigest()[:16]
        self.path, self.setting = root / f"latency-{digest}.json", setting
        self.times: dict[str, float] = {}
        if self.path.exists():
            try:
                self.times = json.loads(self.path.read_text())["times"]
            except (ValueError, KeyError):
                self.times = {}  # a damaged cache is measured again
        self.measured = 0

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _io.write_text(self.path, json.dumps({"setting": self.setting.key(), "times": self.times}))

    def time(self, layers: Mapping[str, torch.nn.Module], spatial: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
        """ms of each layer not cached yet, measured round-robin (a chunk of runs each in turn),
        then all of them."""
        missing = {s: layer for s, layer in layers.items() if s not in self.times}
        groups: dict[tuple[int, ...], dict[str, torch.nn.Module]] = {}
        for s, layer in missing.items():  # one compare() per input size
            groups.setdefault(spatial[s], {})[s] = layer
        for size, batch in groups.items():
            rows = _time_layers(batch, size, self.setting)
            self.times.update({s: r["ms"] for s, r in rows.items()})
            self.measured += len(rows)
        if missing:
            self.save()
        return {s: self.times[s] for s in layers}


def _time_layers(layers: dict[str, torch.nn.Module], spatial: tuple[int, ...],
                 setting: Setting) -> dict[str, dict]:
    """speed.compare on layers whose input side is spatial[0] (square inputs, as the model's)."""
    dtype = getattr(torch, setting.dtype)
    return compare(layers, batch=setting.batch, size=spatial[0], device=setting.device, dtype=dtype,
                   channels_last=setting.channels_last, threads=setting.threads, warmup=2, repeats=5,
                   max_repeats=40, tolerance=0.03)


def latency_model(model: torch.nn.Module, analysis: Analysis, example_input: torch.Tensor, *,
                  device: str = "cpu", threads: Optional[int] = None, dtype: str = "float32",
                  channels_last: bool = False, cache_dir: Union[str, Path, None] = None) -> LatencyModel:
    """Measure (or read from the cache) the latency model of ``model`` as analysed, at the
    deployment input ``example_input`` (its batch and a square spatial size), on ``device``
    with ``threads`` (default: torch's current count), ``dtype`` and layout."""
    setting = Setting(device, threads or torch.get_num_threads(), example_input.shape[0], dtype,
                      channels_last)
    spatial: dict[str, tuple[int, ...]] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(module: torch.nn.Module, args: tuple) -> None:
        spatial.setdefault(f"{names[module]}.weight", tuple(args[0].shape[2:]))
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, _CONVS)]
    try:
        forward_once(model, example_input)
    finally:
        for hook in hooks:
            hook.remove()
    modules = {name: model.get_submodule(name.rsplit(".", 1)[0]) for name in spatial}
    convs = [_Conv(name, m, spatial[name], _is_depthwise(m)) for name in analysis.flops_per_weight
             if name in spatial and isinstance(m := modules[name], ConvNd)]
    cache = _Cache(setting, cache_dir)
    tables = _tables(convs, analysis, cache)
    partial = LatencyModel(analysis, convs, tables, 1.0, 0.0, 1, setting)
    # The fit is cached per network: its layer shapes, groups and input size name it.
    network = "network " + hashlib.sha1(json.dumps(
        [sorted(analysis.shapes.items()), [g.size for g in analysis.groups], list(example_input.shape)],
        default=list).encode()).hexdigest()
    if network + " conv scale" not in cache.times:
        conv_scale, per_activation = _fit(model, analysis, partial, example_input, setting)
        cache.times.update({network + " conv scale": conv_scale, network + " per activation": per_activation})
        cache.measured += 2
        cache.save()
    round_to = _round_to(convs, tables, analysis, cache)
    return LatencyModel(analysis, convs, tables, cache.times[network + " conv scale"],
                        cache.times[network + " per activation"], round_to, setting, cache.measured)


def _is_depthwise(m: ConvNd) -> bool:
    return bool(m.groups > 1 and m.groups == m.in_channels == m.out_channels)


def _tables(convs: list[_Conv], analysis: Analysis, cache: _Cache) -> dict[str, dict]:
    """Each conv's grid of (output width, input width) -> ms."""
    grids, layers, spatial = {}, {}, {}
    for conv in convs:
        shape = analysis.shapes[conv.name]
        outs, ins = _widths(shape[0]), _widths(shape[1])
        grids[conv.name] = (outs, ins)
        for o in outs:
            for i in ins:
                signature = conv.signature(o, i)
                if signature not in layers and signature not in cache.times:
                    layers[signature] = conv.standalone(o, i)
                    spatial[signature] = conv.spatial
    cache.time(layers, spatial)
    return {conv.name: {"out": outs, "in": ins,
                        "ms": [[cache.times[conv.signature(o, i)] for i in ins] for o in outs]}
            for conv in convs for outs, ins in [grids[conv.name]]}


def _fit(model: torch.nn.Module, analysis: Analysis, convs_only: LatencyModel,
         example_input: torch.Tensor, setting: Setting) -> tuple[float, float]:
    """(conv scale, ms per conv output activation) that make ``conv_scale * conv ms +
    per_activation * activations`` equal the timings of the model and of a copy keeping half of
    every group, timed round-robin (``convs_only`` gives the convs' table time)."""
    half = copy.deepcopy(model)
    keep = {i: torch.arange(max(1, g.size // 2)) for i, g in enumerate(analysis.groups) if g.prunable}
    prune_(half, analysis, keep)
    size = example_input.shape[-1]
    rows = compare({"full": model, "half": half}, batch=setting.batch, size=size, device=setting.device,
                   dtype=getattr(torch, setting.dtype), channels_last=setting.channels_last,
                   threads=setting.threads, warmup=3, repeats=5, max_repeats=60, tolerance=0.02)
    (c_full, a_full), (c_half, a_half) = convs_only.conv_terms(), convs_only.conv_terms(
        {i: len(k) for i, k in keep.items()})
    t_full, t_half = rows["full"]["ms"], rows["half"]["ms"]
    determinant = c_full * a_half - c_half * a_full
    if determinant:  # Cramer's rule on the two timings
        scale = (t_full * a_half - t_half * a_full) / determinant
        per_activation = (c_full * t_half - c_half * t_full) / determinant
        if scale > 0 and per_activation >= 0:
            return scale, per_activation
    return (t_full / c_full if c_full else 1.0), 0.0  # nothing prunable, or too noisy to split


def _round_to(convs: list[_Conv], tables: dict[str, dict], analysis: Analysis, cache: _Cache) -> int:
    """pick_round_to on the output widths of the model's slowest conv, from 16 below its own."""
    slowest = max(convs, key=lambda c: tables[c.name]["ms"][-1][-1])
    full_out, full_in = analysis.shapes[slowest.name][:2]
    widths = list(range(max(1, full_out - 16), full_out + 1))
    layers = {slowest.signature(w, full_in): slowest.standalone(w, full_in) for w in widths}
    times = cache.time(layers, {s: slowest.spatial for s in layers})
    return pick_round_to({w: times[slowest.signature(w, full_in)] for w in widths})


def pick_round_to(ms: dict[int, float]) -> int:
    """The largest of 16, 8, 4, 2 such that rounding a width up to a multiple of it is never
    slower (by more than 2%) in the timings ``ms`` {width: ms}, else 1: where a device works in
    blocks of channels, the channels rounding keeps cost nothing."""
    widths = list(ms)
    for r in (16, 8, 4, 2):
        ups = [(w, -(-w // r) * r) for w in widths if w % r and -(-w // r) * r in ms]
        if ups and all(ms[up] <= 1.02 * ms[w] for w, up in ups):
            return r
    return 1
