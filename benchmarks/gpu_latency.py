"""Batch-1 latency of Unet-resnet34 at 352x352, unpruned and pruned, in float16 and bfloat16
channels_last: what a pruned model gains where it is meant to run (benchmarks/gpu_check.sh).

The pruned model loses --amount (default 50%) of its conv FLOPs: random channel scores (the
latency does not depend on which channels go), every group rounded to multiples of 8 channels
for tensor cores. Latency is polyprune_ext.speed.latency (eval mode, inference_mode, autocast,
median of --repeats runs after --warmup). Prints a table, and a JSON line with every row.
"""

import argparse
import json

import segmentation_models_pytorch as smp
import torch

from polyprune_ext import analyze, cost, latency, select_channels
from polyprune_ext.structure import prune_


def pruned(model, amount, size, seed=0):
    """model with `amount` of its conv FLOPs removed (random scores), and (before, after) costs."""
    analysis = analyze(model, torch.randn(1, 3, size, size))
    gen = torch.Generator().manual_seed(seed)
    scores = {i: torch.rand(g.size, generator=gen) for i, g in enumerate(analysis.groups)
              if g.prunable}
    keep = select_channels(analysis, scores, amount=amount, target="flops", round_to=8)
    before, after = cost(analysis), cost(analysis, {i: len(k) for i, k in keep.items()})
    prune_(model, analysis, keep)
    return model, before, after


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"unpruned": smp.Unet("resnet34", encoder_weights=None)}
    small, before, after = pruned(smp.Unet("resnet34", encoder_weights=None), args.amount, args.size)
    models[f"pruned -{args.amount:.0%} FLOPs"] = small
    gflops = {"unpruned": before["flops"] / 1e9, f"pruned -{args.amount:.0%} FLOPs": after["flops"] / 1e9}
    params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}
    rows = []
    print(f"Unet-resnet34, batch 1, {args.size}x{args.size}, channels_last, {args.device}: "
          f"{torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'CPU'}")
    print("| model | params M | conv GFLOPs | dtype | median ms | p90 ms | fps |")
    print("|---|---|---|---|---|---|---|")
    cuda = args.device.startswith("cuda")
    for dtype in (torch.float16, torch.bfloat16) if cuda else (torch.bfloat16,):  # CPU: a smoke test
        for name, model in models.items():
            r = latency(model, batch=1, size=args.size, device=args.device, dtype=dtype,
                        channels_last=True, warmup=args.warmup, repeats=args.repeats)
            rows.append({"model": name, "params_m": params[name], "gflops": gflops[name], **r})
            print(f"| {name} | {params[name]:.1f} | {gflops[name]:.1f} | {r['dtype']} | "
                  f"{r['ms']:.2f} | {r['ms_p90']:.2f} | {r['fps']:.0f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
