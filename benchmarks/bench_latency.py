"""The latency model against measurement: is a predicted latency a latency?

For each --encoder (smp Unet, random weights: speed does not depend on them) at batch 1 and
--size, on --threads threads: the latency model is built (or read from the cache, --cache), then
copies of the network are pruned in ways the model was not fitted on (channels chosen by random
scores: -30/-50/-70% FLOPs globally, -50% FLOPs the same in every layer, -50% and -70% latency by
the latency target) and all are timed round-robin (speed.compare) against the model's prediction.
The model is fitted on the network and a copy keeping half of every group; those two are timed
again here too. The target the issue sets: within 10% on this CPU.
"""

import argparse
import copy
import time

import segmentation_models_pytorch as smp
import torch

from _common import add_options, append_if_asked, heading, setup

from polyprune_ext import analyze, cost, latency_model, select_channels, speed
from polyprune_ext.structure import prune_

PRUNES = [("flops", "global", 0.3), ("flops", "global", 0.5), ("flops", "global", 0.7),
          ("flops", "layer", 0.5), ("latency", "global", 0.5), ("latency", "global", 0.7)]


def rows_for(encoder, args):
    model = smp.Unet(encoder, encoder_weights=None).eval()
    x = torch.zeros(1, 3, args.size, args.size)
    analysis = analyze(model, x)
    start = time.time()
    lm = latency_model(model, analysis, x, threads=args.threads, cache_dir=args.cache)
    built = time.time() - start
    models, predicted = {"unpruned": model}, {"unpruned": lm.predict()}
    half = {i: max(1, g.size // 2) for i, g in enumerate(analysis.groups) if g.prunable}
    models["half of every group (fitted)"] = pruned(model, analysis, {i: torch.arange(k) for i, k in half.items()})
    predicted["half of every group (fitted)"] = lm.predict(half)
    gen = torch.Generator().manual_seed(0)
    for target, scope, amount in PRUNES:
        scores = {i: torch.rand(g.size, generator=gen) for i, g in enumerate(analysis.groups) if g.prunable}
        keep = select_channels(analysis, scores, amount=amount, target=target, scope=scope,
                               round_to=lm.round_to, latency=lm)
        name = f"-{amount:.0%} {target}, {scope}"
        models[name] = pruned(model, analysis, keep)
        predicted[name] = cost(analysis, {i: len(k) for i, k in keep.items()}, lm)["latency"]
    timed = speed.compare(models, batch=1, size=args.size, threads=args.threads, warmup=3,
                          repeats=10, max_repeats=100, tolerance=0.01)
    lines = [f"#### Unet-{encoder}, {args.size}x{args.size}, batch 1, {timed['unpruned']['threads']} "
             f"thread(s): latency model built in {built:.0f} s ({lm.measured} timings measured, "
             f"round_to {lm.round_to})", "",
             "| model | predicted ms | measured ms (p10-p90) | error |", "|---|---|---|---|"]
    for name, row in timed.items():
        p = predicted[name]
        lines.append(f"| {name} | {p:.1f} | {row['ms']:.1f} ({row['ms_p10']:.1f}-{row['ms_p90']:.1f}) | "
                     f"{p / row['ms'] - 1:+.1%} |")
    return lines


def pruned(model, analysis, keep):
    copied = copy.deepcopy(model)
    prune_(copied, analysis, keep)
    return copied


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["resnet18", "resnet34"])
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--cache", default=None, help="the latency cache folder (default: the user's)")
    add_options(parser)
    args = parser.parse_args()
    setup(args)
    lines = heading("cpu") + ["### The latency model against measurement", ""]
    for encoder in args.encoders:
        lines += rows_for(encoder, args) + [""]
        print("\n".join(lines[-12:]), flush=True)
    append_if_asked(lines, args)


if __name__ == "__main__":
    main()
