"""What TaylorFO scoring costs inside a training step: time and peak memory, fused against eager.

Unet-resnet34 (encoder_weights=None), one training step = forward, Dice-free BCE loss, backward
(no optimizer step). Three variants, each in its own process so that peak memory is its own:
  - plain: the step alone;
  - fused: the same step inside ``Pruner.scoring()`` (normalized mode), the kernel path;
  - torch: the same with ``backend="torch"``, eager ops (materialises activation x gradient).
Time is the median over --steps steps after 2 warm-up steps. Peak memory is the process's peak
resident set on the CPU (ru_maxrss, so it includes the ~0.5 GB of Python and torch) and
torch.cuda.max_memory_allocated on CUDA. Prints a table and appends it to benchmarks/RESULTS.md.
Targets: fused overhead <= 10% on a CPU, <= 5% on an H200; peak memory <= plain + 2%.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("plain", "fused", "torch")


def run_variant(variant, batch, size, steps, device):
    import segmentation_models_pytorch as smp

    import polyprune_ext

    torch.manual_seed(0)
    model = smp.Unet("resnet34", encoder_weights=None).to(device).train()
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    pruner = None if variant == "plain" else polyprune_ext.Pruner(
        model, example_input=x[:1], backend=variant)
    times = []
    for step in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
            if step == 2:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with pruner.scoring() if pruner else torch.enable_grad():
            loss_fn(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times[2:]), "peak": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--no-append", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.size, args.steps, args.device)))
        return
    from bench_ops import append_results, heading

    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--device", args.device,
                   "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
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
    if not args.no_append:
        append_results(report)


if __name__ == "__main__":
    main()
