"""Does the first-order estimate rank channels by what removing them really costs?

On a trained checkpoint (bench_polyp's unpruned model by default) and one set of validation
batches: for --channels channels drawn from every prunable group, each channel alone is zeroed at
its gates (surgery.zero_channels: exactly its removal) and the change is measured in

  - the loss (Dice+BCE) and the normalized-gradient objective sum_n <g_n/|g_n|, y_n> the
    normalized TaylorFO estimates;
  - the validation Dice (what pruning must keep);

against each criterion's score of that channel: TaylorFO's first-order estimates (loss and
normalized gradients, per channel |sum_n z|), L1 and BN scale. Spearman rank correlations over all the
channels, and within groups, say which scores order channels by their real cost.
"""

import argparse
import statistics

import torch

from _common import add_options, append_if_asked, heading, setup

import polyprune_ext
from polyprune_ext import baseline_scores, score, zero_channels
from polyprune_ext.tasks.polyp import TASK


def ranks(values):
    order = torch.as_tensor(values, dtype=torch.float64).argsort()
    result = torch.empty_like(order, dtype=torch.float64)
    result[order] = torch.arange(len(values), dtype=torch.float64)
    return result


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def objectives(model, batches):
    """(loss, normalized-gradient objective, Dice) of ``model`` on ``batches``; the objective's
    unit gradients come from the unpruned model (``batches`` carries them)."""
    loss, linear, metrics = 0.0, 0.0, TASK.metrics()
    with torch.no_grad():
        for x, y, g in batches:
            out = model(x)
            loss += float(TASK.loss_fn(out, y))
            linear += float((g * out).sum())
            metrics.update(out, y)
    return loss, linear, metrics.compute()["dice"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/work/runs/bench_polyp/unpruned/model.safetensors")
    parser.add_argument("--data", default="../shared/data/kvasir-seg")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=4, help="channels per group")
    parser.add_argument("--batches", type=int, default=8, help="validation batches of 8")
    add_options(parser)
    args = parser.parse_args()
    setup(args)
    torch.manual_seed(0)
    model = polyprune_ext.load(args.checkpoint).eval()
    _, val = TASK.load_data(args.data, size=args.size, val_count=120, seed=0)
    loader = torch.utils.data.DataLoader(val, batch_size=8)
    batches = []
    for i, (x, y) in enumerate(loader):
        if i == args.batches:
            break
        x = x.requires_grad_(False)
        out = model(x)
        (g,) = torch.autograd.grad(TASK.loss_fn(out, y), out)
        norms = g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
        batches.append((x, y, (g / norms).detach()))
    pairs = [(x, y) for x, y, _ in batches]
    scores = {"taylor/normalized": score(model, pairs, loss_fn=TASK.loss_fn, progress=False),
              "taylor/loss": score(model, pairs, loss_fn=TASK.loss_fn, grad="loss", progress=False),
              "l1": baseline_scores(model, "l1", example_input=pairs[0][0][:1]),
              "bn_scale": baseline_scores(model, "bn_scale", example_input=pairs[0][0][:1])}
    analysis = scores["taylor/normalized"].analysis
    base = objectives(model, batches)
    gen = torch.Generator().manual_seed(0)
    sampled, measured = [], []  # (group, channel); (loss change, objective change, Dice drop)
    for i, group in enumerate(analysis.groups):
        if not group.prunable:
            continue
        for c in torch.randperm(group.size, generator=gen)[:args.channels].tolist():
            handles = zero_channels(model, analysis, {i: [c]})
            loss, linear, dice = objectives(model, batches)
            for h in handles:
                h.remove()
            sampled.append((i, c))
            measured.append((loss - base[0], linear - base[1], base[2] - dice))
    lines = heading("cpu") + [
        f"### First-order estimates against the measured cost of removing one channel: {args.checkpoint}, "
        f"{len(sampled)} channels ({args.channels} from each of {len(sampled) // args.channels} groups), "
        f"{args.batches} validation batches of 8 at {args.size}x{args.size}", "",
        "| score | Spearman with the loss increase | with the objective change (abs) | with the Dice drop | "
        "median within-group Spearman with the Dice drop |", "|---|---|---|---|---|"]
    for name, s in scores.items():
        values = [float(s.values[i][c]) for i, c in sampled]
        loss_up = [m[0] for m in measured]
        objective = [abs(m[1]) for m in measured]
        dice_drop = [m[2] for m in measured]
        within = []
        for i in {i for i, _ in sampled}:
            idx = [k for k, (g, _) in enumerate(sampled) if g == i]
            if len({dice_drop[k] for k in idx}) > 1:
                within.append(spearman([values[k] for k in idx], [dice_drop[k] for k in idx]))
        lines.append(f"| {name} | {spearman(values, loss_up):+.3f} | {spearman(values, objective):+.3f} | "
                     f"{spearman(values, dice_drop):+.3f} | {statistics.median(within) if within else float('nan'):+.3f} |")
    lines += ["", f"Unpruned on these batches: loss {base[0]:.4f}, Dice {base[2]:.4f}; the largest Dice drop "
              f"from one channel: {max(m[2] for m in measured):.4f}; channels whose removal changes Dice by "
              f"less than 1e-4: {sum(abs(m[2]) < 1e-4 for m in measured)} of {len(measured)}."]
    print("\n".join(lines))
    append_if_asked(lines, args)


if __name__ == "__main__":
    main()
