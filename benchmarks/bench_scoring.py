"""What TaylorFO scoring costs inside a training step: time and peak memory, fused against eager.

Unet-resnet34 (encoder_weights=None), one training step = forward, BCE loss, backward (no
optimizer step). Three variants:
  - plain: the step alone;
  - fused: the same step inside ``Pruner.scoring()`` (normalized mode), the kernel path;
  - torch: the same with ``backend="torch"``, eager ops (materialises activation x gradient).
Time is the median over --steps steps, the three variants interleaved step by step on one model
after a warm-up round. Peak memory comes from a separate process per variant: the peak resident
set on the CPU (ru_maxrss, so it includes the ~0.5 GB of Python and torch), and
torch.cuda.max_memory_allocated on CUDA. Prints a table and appends it to benchmarks/RESULTS.md.
Targets: fused overhead <= 10% on a CPU, <= 5% on an H200; peak memory <= plain + 2%.
"""

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from _common import add_options, append_if_asked, heading

VARIANTS = ("plain", "fused", "torch")


def setup(batch, size, device):
    import segmentation_models_pytorch as smp

    import polyprune_ext

    torch.manual_seed(0)
    model = smp.Unet("resnet34", encoder_weights=None).to(device).train()
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    contexts = {"plain": contextlib.nullcontext}
    for backend in ("fused", "torch"):
        contexts[backend] = polyprune_ext.Pruner(model, example_input=x[:1], backend=backend).scoring

    def step(variant):
        """Seconds of one training step (forward and backward) of the variant."""
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with contexts[variant]():
            loss_fn(model(x), y).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds

    return step


def peak_memory(variant, batch, size, device):
    """Peak memory of a process that runs only this variant (2 steps)."""
    step = setup(batch, size, device)
    step(variant)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step(variant)
    return torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_times(batch, size, steps, device):
    """Median seconds per variant, the variants interleaved step by step so that drifts in the
    machine's speed hit them alike (after one warm-up round)."""
    step = setup(batch, size, device)
    times = {v: [] for v in VARIANTS}
    for warm_up_done in (False,) + (True,) * steps:
        for variant in VARIANTS:
            seconds = step(variant)
            if warm_up_done:
                times[variant].append(seconds)
    return {v: statistics.median(t) for v, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    add_options(parser)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(peak_memory(args.variant, args.batch, args.size, args.device)))
        return

    seconds = step_times(args.batch, args.size, args.steps, args.device)
    results = {}
    for variant in VARIANTS:  # each in its own process, so that its peak is its own
        command = [sys.executable, __file__, "--variant", variant, "--device", args.device,
                   "--batch", str(args.batch), "--size", str(args.size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = {"seconds": seconds[variant],
                            "peak": json.loads(done.stdout.strip().splitlines()[-1])}
    plain = results["plain"]
    memory = "peak RSS" if args.device == "cpu" else "peak allocated"
    report = heading(args.device) + [
        f"### Scoring inside a training step, Unet-resnet34, batch {args.batch}, {args.size}x{args.size}, "
        f"normalized mode, median of {args.steps} steps", "",
        f"| variant | step ms | time overhead | {memory} MiB | memory overhead |", "|---|---|---|---|---|"]
    for variant, r in results.items():
        report.append(f"| {variant} | {r['seconds'] * 1e3:.1f} | {r['seconds'] / plain['seconds'] - 1:+.1%} | "
                      f"{r['peak'] / 2**20:.0f} | {r['peak'] / plain['peak'] - 1:+.1%} |")
    print("\n".join(report))
    append_if_asked(report, args)


if __name__ == "__main__":
    main()
