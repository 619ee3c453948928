"""Benchmark polyprune_ext's two ops against the PyTorch a pruning loop would otherwise use.

Reduction: ``taylor_reduce(act, grad, scale, reduce="sum", out=acc)`` is timed on the output shape
of every Conv2d of smp ``Unet("resnet34")`` at batch 16 and 352x352 input (found by forward hooks
on the "meta" device, so nothing is computed); each distinct shape is timed once and weighted by
how many convs produce it. Per float32/bfloat16 and NCHW/channels_last it is compared with

- eager sum: ``(torch.sum(a * g, (2, 3), dtype=torch.float32) * scale[:, None]).sum(0)``, float32
  accumulation without the extra cast pass of ``(a * g).float().sum((2, 3))`` (as fast or slower);
- eager einsum: ``torch.einsum("nchw,nchw->nc", a, g)``, then the same cast, scale and batch sum;
- compile: ``torch.compile(dynamic=False)`` of the eager-sum expression, compiled per row;
- ``x.sum()`` over one flat tensor of the bytes of a and g together: the read bandwidth this
  machine reaches in the same run, the ceiling for a one-pass reduction.

On CUDA a short table follows with the memory bandwidth of ``x.sum()`` (read) and of a
device-to-device ``copy_`` (read + write) over the bytes of the largest float32 input pair and
over 4x that, measured in the same run.

The fused op accumulates into a preallocated ``out`` (zeroed once), as training does. Times are
medians of torch.utils.benchmark blocked_autorange after a warm-up call. "Faster eager" is the
faster eager variant per shape; totals over the weighted shape set are checked against TARGETS.

Compaction: ``compact_`` keeps a random 50% of output (dim 0) or input (dim 1) channels of the
largest Unet conv weights, in place; compared with ``reference.compact`` (index_select into a new
tensor). The clone giving each repeat a fresh tensor is not timed. Extra memory is the
max_memory_allocated delta on CUDA, and on CPU the bytes the op allocates (sum of positive
self_cpu_memory_usage in torch.profiler with profile_memory=True).
"""

import argparse
import collections
import math
import statistics
import sys
import time

import segmentation_models_pytorch as smp
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Timer

from _common import add_options, append_if_asked, heading, setup
from polyprune_ext import ops
from polyprune_ext.ops import reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
VARIANTS = ("fused", "eager sum", "einsum", "compile", "x.sum()")


def unet_shapes(batch):
    """(Counter of Conv2d output shapes, list of Conv2d weight shapes) of Unet-resnet34."""
    outputs = collections.Counter()
    with torch.device("meta"):
        model = smp.Unet("resnet34", encoder_weights=None)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        for conv in convs:
            conv.register_forward_hook(lambda m, i, o: outputs.update([tuple(o.shape)]))
        with torch.no_grad():
            model(torch.empty(batch, 3, 352, 352))
    return outputs, [tuple(c.weight.shape) for c in convs]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, min_run_time):
    fn()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def eager_sum(a, g, scale):
    return (torch.sum(a * g, (2, 3), dtype=torch.float32) * scale[:, None]).sum(0)


def eager_einsum(a, g, scale):
    return (torch.einsum("nchw,nchw->nc", a, g).float() * scale[:, None]).sum(0)


def compiled_eager_sum(a, g, scale):
    """eager_sum compiled for these inputs' shape, dtype and layout, or None if it fails."""
    torch.compiler.reset()
    fn = torch.compile(eager_sum, dynamic=False)
    try:
        fn(a, g, scale)
    except Exception as error:  # report "n/a" for this row, not crash the run
        print(f"torch.compile failed for {tuple(a.shape)} {a.dtype}: {error!r}", file=sys.stderr)
        return None
    return fn


def time_reduction(shape, dtype, fmt, device, min_run_time):
    """Seconds per call of every variant (None where compile failed) for one input shape."""
    a = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    g = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    scale = torch.rand(shape[0], device=device)
    out = torch.zeros(shape[1], device=device)
    flat = torch.randn(2 * a.numel(), device=device).to(dtype)
    compiled = compiled_eager_sum(a, g, scale)
    fns = {"fused": lambda: ops.taylor_reduce(a, g, scale, reduce="sum", out=out),
           "eager sum": lambda: eager_sum(a, g, scale), "einsum": lambda: eager_einsum(a, g, scale),
           "compile": compiled and (lambda: compiled(a, g, scale)), "x.sum()": flat.sum}
    return {name: fn and median_time(fn, min_run_time) for name, fn in fns.items()}


def ms(seconds):
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.3f}"


TARGETS = {"cpu": "CPU: >= 2x faster eager, >= 70% of x.sum() bandwidth on every shape >= 8 MB",
           "cuda": "CUDA: >= 80% of x.sum() bandwidth on shapes >= 64 MB, >= 2x faster eager, "
                   "no slower than torch.compile"}


def emit(report, *lines):
    """Print lines as they are measured and keep them for RESULTS.md."""
    print(*lines, sep="\n", flush=True)
    report.extend(lines)


def reduction_section(report, shapes, device, min_run_time):
    """One row per shape x dtype x format, then the totals against the targets."""
    emit(report, "| shape | convs | dtype | format | MB read | "
         + " | ".join(f"{v} ms" for v in VARIANTS)
         + " | fused GB/s | frac of x.sum() BW | speedup vs faster eager |", "|" + "---|" * 13)
    summary = ["", f"Totals over the weighted shape set. Targets ({TARGETS[device]}):", "",
               "| dtype | format | fused ms | faster eager ms | compile ms | speedup vs eager | "
               "min BW frac >= 8 MB | min BW frac >= 64 MB | verdict |", "|" + "---|" * 9]
    overall = collections.Counter()
    for dtype_name, dtype in DTYPES.items():
        for fmt_name, fmt in FORMATS.items():
            totals = collections.Counter()
            fracs = []  # (MB read, fraction of x.sum() bandwidth) per shape
            for shape, count in shapes.items():
                t = time_reduction(shape, dtype, fmt, device, min_run_time)
                mb = 2 * torch.Size(shape).numel() * dtype.itemsize / 1e6
                eager = min(t["eager sum"], t["einsum"])
                fracs.append((mb, t["x.sum()"] / t["fused"]))
                totals.update(fused=count * t["fused"], eager=count * eager,
                              compile=count * t["compile"] if t["compile"] else float("nan"))
                emit(report, f"| {shape} | {count} | {dtype_name} | {fmt_name} | {mb:.1f} | "
                     + " | ".join(ms(t[v]) for v in VARIANTS)
                     + f" | {mb / 1e3 / t['fused']:.1f} | {fracs[-1][1]:.0%} | "
                     f"{eager / t['fused']:.2f}x |")
            summary.append(summary_row(dtype_name, fmt_name, totals, fracs, device))
            overall.update(fused=totals["fused"], eager=totals["eager"])
    summary += ["", f"Whole shape set, both dtypes and formats: fused {ms(overall['fused'])} ms, faster eager "
                f"{ms(overall['eager'])} ms, {overall['eager'] / overall['fused']:.2f}x."]
    emit(report, *summary)


def summary_row(dtype_name, fmt_name, totals, fracs, device):
    speedup = totals["eager"] / totals["fused"]
    frac8, frac64 = (min((f for mb, f in fracs if mb >= least), default=None) for least in (8, 64))
    if device == "cpu":
        checks = {">= 2x eager": speedup >= 2, ">= 70% BW": frac8 is None or frac8 >= 0.7}
    else:
        checks = {">= 2x eager": speedup >= 2, ">= 80% BW": frac64 is None or frac64 >= 0.8,
                  "<= compile": totals["fused"] <= totals["compile"]}  # False when compile is NaN
    verdict = ", ".join(f"{name} {'PASS' if ok else 'MISS'}" for name, ok in checks.items())
    pct = lambda f: "n/a" if f is None else f"{f:.0%}"
    return (f"| {dtype_name} | {fmt_name} | {ms(totals['fused'])} | {ms(totals['eager'])} | "
            f"{ms(totals['compile'])} | {speedup:.2f}x | {pct(frac8)} | {pct(frac64)} | {verdict} |")


def bandwidth_section(report, shapes, device, min_run_time):
    """x.sum() and a device-to-device copy over the bytes of the largest float32 input pair, and
    over 4x that: the bandwidth this GPU reaches in this run."""
    largest = max(torch.Size(s).numel() for s in shapes)
    emit(report, "| op | MB read | MB written | ms | GB/s |", "|---|---|---|---|---|")
    for numel in (2 * largest, 8 * largest):
        src = torch.randn(numel, device=device)
        dst = torch.empty_like(src)
        mb = src.nbytes / 1e6
        t_sum = median_time(src.sum, min_run_time)
        t_copy = median_time(lambda d=dst, s=src: d.copy_(s), min_run_time)
        emit(report, f"| x.sum() | {mb:.1f} | 0 | {ms(t_sum)} | {mb / 1e3 / t_sum:.0f} |",
             f"| copy_ device to device | {mb:.1f} | {mb:.1f} | {ms(t_copy)} | "
             f"{2 * mb / 1e3 / t_copy:.0f} |")
        del src, dst


def extra_memory(fn, tensor, device):
    """Bytes that fn(tensor) allocates beyond what is already allocated (see module docstring)."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(tensor)
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(tensor)
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def time_compaction(fn, weight, device, repeats):
    """Median seconds of fn on a fresh clone of weight; the clone is not timed."""
    times = []
    for _ in range(repeats + 1):  # the first call is a warm-up
        tensor = weight.clone()
        sync(device)
        start = time.perf_counter()
        fn(tensor)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def compaction_section(report, weight_shapes, device, count, repeats):
    """One row per dim of each of the `count` largest conv weights."""
    emit(report, "| shape | dim | MB | compact_ ms | index_select ms | compact_ extra MB | "
         "index_select extra MB |", "|" + "---|" * 7)
    largest = sorted(set(weight_shapes), key=lambda s: torch.Size(s).numel(), reverse=True)
    for shape in largest[:count]:
        weight = torch.randn(shape, device=device)
        for dim in (0, 1):
            keep = torch.randperm(shape[dim], device=device)[: shape[dim] // 2].sort().values
            ours = lambda t: ops.compact_(t, keep, dim)
            theirs = lambda t: reference.compact(t, keep, dim)
            cells = [ms(time_compaction(f, weight, device, repeats)) for f in (ours, theirs)]
            cells += [f"{extra_memory(f, weight.clone(), device) / 1e6:.2f}" for f in (ours, theirs)]
            emit(report, f"| {shape} | {dim} | {weight.numel() * 4 / 1e6:.1f} | "
                 + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--quick", action="store_true", help="batch 2, short timings: a smoke test")
    parser.add_argument("--min-run-time", type=float,
                        help="seconds of timed runs per measurement (default 0.3, 0.02 with --quick)")
    add_options(parser)
    args = parser.parse_args()
    setup(args)
    torch.manual_seed(0)
    batch, min_run_time, weights, repeats = (2, 0.02, 2, 2) if args.quick else (16, 0.3, 4, 7)
    if args.min_run_time is not None:
        min_run_time = args.min_run_time
    shapes, weight_shapes = unet_shapes(batch)
    report = []
    emit(report, *heading(args.device), f"### Taylor reduction, reduce 'sum', batch {batch} "
         f"({sum(shapes.values())} convs, {len(shapes)} distinct shapes)", "")
    reduction_section(report, shapes, args.device, min_run_time)
    if args.device == "cuda":
        emit(report, "", "### Memory bandwidth in this run", "")
        bandwidth_section(report, shapes, args.device, min_run_time)
    emit(report, "", "### Compaction to 50% of channels, float32", "")
    compaction_section(report, weight_shapes, args.device, weights, repeats)
    append_if_asked(report, args)


if __name__ == "__main__":
    main()
