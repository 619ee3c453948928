"""Nuclei instance segmentation: magnitude pruning sweeps, layer-wise against network-wide.

For each data set (--data: a DSB2018 folder, a label-image folder or "synthetic"; several may be
given), the two-branch NucleiNet is trained from scratch once (its checkpoint is reused when
--out holds a finished one), then polyprune_ext.engine.sweep runs every compression ratio with both
scopes, fine-tuning --finetune-epochs after each (gradual by default; an interrupted sweep
resumes after the points in its sweep.json). Prints, and appends to
benchmarks/RESULTS.md: the unpruned metrics, the sweep table (semantic Dice, regression MSE,
instance AJI and PQ, dense and compressed checkpoint sizes), where the scopes cross, and the
largest CR at which each metric stays within 2% of the unpruned model and of the CR 1 point
(the same fine-tuning with nothing pruned); the issue's targets: Dice at CR 16, MSE at CR 20,
AJI at CR 5. Then, per network, the --sensitive layers whose pruning alone (--sensitivity-sparsity
of that layer's weights, no fine-tuning) hurts its metric most: what makes layer-wise pruning,
which prunes small layers as hard as large ones, fall behind.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from _common import add_options, append_if_asked, heading
from torch.nn.utils import prune

from polyprune_ext.engine import TrainConfig, Trainer, report, seed_everything, sweep
from polyprune_ext.tasks.nuclei import TASK, NucleiMetrics, NucleiNet, nuclei_datasets
from polyprune_ext.unstructured import magnitude

# metric, higher is better, the CR the issue asks it to survive within 2%
TARGETS = (("dice", True, 16), ("mse", False, 20), ("aji", True, 5))


def trainer(model, args, data, out_dir):
    common = dict(size=args.size, val_count=args.val_count, val_fraction=args.val_fraction, seed=0)
    if data == "synthetic":
        common["count"] = args.synthetic_count
    train, val = nuclei_datasets(None if data == "synthetic" else data, **common)
    config = TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=0)
    return Trainer(model, TASK, train, val, config, device=args.device, out_dir=out_dir,
                   progress=False), len(train), len(val)


def largest_cr_within(rows, base, metric, higher, scope, tolerance=0.02):
    """The largest CR up to which ``metric`` stays within ``tolerance`` (relative) of ``base``."""
    best = None
    for r in sorted((r for r in rows if r["scope"] == scope), key=lambda r: r["cr"]):
        ok = r[metric] >= base * (1 - tolerance) if higher else r[metric] <= base * (1 + tolerance)
        if not ok:
            break
        best = r["cr"]
    return best


def sensitivity(t, sparsity, count):
    """Markdown rows: for each network of the trained model, the ``count`` convs whose magnitude
    pruning alone, to ``sparsity`` and without fine-tuning, hurts its own metric most (semantic:
    Dice, regression: MSE)."""
    t.task = dataclasses.replace(TASK, metrics=lambda: NucleiMetrics(instances=False))  # no watershed
    base = t.evaluate()
    rows = [f"| network | conv | weights | {sparsity:.0%} of it pruned: Dice | MSE |", "|---|---|---|---|---|"]
    for net_name, network in t.model.networks().items():
        names = {id(m): n for n, m in network.named_modules()}
        found = []
        for module, name in magnitude.prunable_tensors(network):
            original = getattr(module, name).detach().clone()
            prune.l1_unstructured(module, name, amount=sparsity)
            r = t.evaluate()
            prune.remove(module, name)
            getattr(module, name).data.copy_(original)
            found.append((r["dice"], r["mse"], names[id(module)], original.numel()))
        worst = sorted(found, key=lambda f: -f[1] if net_name == "regression" else f[0])[:count]
        rows += [f"| {net_name} | {n} | {w} | {d:.4f} | {m:.4f} |" for d, m, n, w in worst]
    t.task = TASK
    return [f"Unpruned, pixel metrics: Dice {base['dice']:.4f}, MSE {base['mse']:.5f}", ""] + rows


def run(args, data, out):
    seed_everything(0)
    model = NucleiNet(args.arch, args.encoder, shared_encoder=args.shared_encoder)
    t, n_train, n_val = trainer(model, args, data, out / "trained")
    start = time.time()
    if (out / "trained" / "train_state.pt").exists():
        t.resume()
    t.fit(args.epochs - t.epoch)
    trained_s = time.time() - start
    base = t.evaluate()
    start = time.time()
    logged = out / "sweep.json"  # the points of an interrupted sweep: it resumes after them
    rows = sweep.compression_sweep(t, crs=args.crs, finetune_epochs=args.finetune_epochs,
                                   finetune_lr=args.finetune_lr, scopes=args.scopes,
                                   bn_recal_images=args.bn_recal_images, first=not args.keep_first, last=not args.keep_last,
                                   out_dir=out / "points",
                                   rows=json.loads(logged.read_text()) if logged.exists() else None,
                                   on_row=lambda rows: report.write_rows(rows, out, "sweep"))
    sweep.plot_sweep(rows, TASK.reported, out / "sweep.png", title=f"{data}: magnitude pruning")
    dense = [name for name, keep in (("first", args.keep_first), ("last", args.keep_last)) if keep]
    kept = f"; the {' and '.join(dense)} conv of each network kept dense" if dense else ""
    lines = [f"### Nuclei, {data} ({n_train} train / {n_val} val images at {args.size}x{args.size}), "
             f"NucleiNet({args.arch}, {args.encoder}, shared_encoder={args.shared_encoder}); "
             f"trained {args.epochs} epochs ({trained_s:.0f} s here; 0 if reused); sweep: gradual, "
             f"{args.finetune_epochs} fine-tuning epoch(s) per point at lr {args.finetune_lr:g}, BatchNorm "
             f"re-calibrated on {args.bn_recal_images} images after each prune"
             f"{kept}, {time.time() - start:.0f} s", "",
             f"Unpruned: Dice {base['dice']:.4f}, MSE {base['mse']:.5f}, AJI {base['aji']:.4f}, "
             f"PQ {base['pq']:.4f}", "", sweep.sweep_table(rows, TASK.reported), "",
             *(sweep.crossing_summary(rows, TASK.reported) if len(args.scopes) == 2 else [])]
    # Two references: the trained model, and the CR 1 point (the same fine-tuning, nothing
    # pruned), which separates what pruning costs from what the extra epochs change.
    control = {s: next((r for r in rows if r["scope"] == s and r["cr"] == 1), None) for s in args.scopes}
    for metric, higher, goal in TARGETS:
        for reference in ("unpruned", "CR 1"):
            reached = {}
            for s in args.scopes:
                ref = base if reference == "unpruned" else control[s]
                reached[s] = None if ref is None else largest_cr_within(rows, ref[metric], metric, higher, s)
            lines.append(f"- {metric} within 2% of {reference} up to CR: "
                         + ", ".join(f"{sweep.SCOPE_NAMES[s]} {'none' if c is None else f'{c:g}'}"
                                     for s, c in reached.items()) + f" (target: CR {goal})")
    lines.append(f"- plot: {out / 'sweep.png'} (not committed)")
    if args.sensitive:
        lines += ["", f"Most sensitive convs of the trained model ({args.sensitivity_sparsity:.0%} "
                  "of one conv's weights pruned, nothing else, no fine-tuning):", "",
                  *sensitivity(t, args.sensitivity_sparsity, args.sensitive)]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["../shared/data/dsb2018-stage1-test", "synthetic"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--val-count", type=int, default=None, help="default: --val-fraction of each set")
    parser.add_argument("--val-fraction", type=float, default=0.25,
                        help="held out for validation (0.25: 16 of DSB's 65 images; fewer make "
                        "AJI and PQ jump by points between neighbouring CRs)")
    parser.add_argument("--synthetic-count", type=int, default=120)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--shared-encoder", action="store_true")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--bn-recal-images", type=int, default=256, help="after each prune; 0: never")
    parser.add_argument("--crs", type=float, nargs="+", default=list(sweep.CRS))
    parser.add_argument("--scopes", nargs="+", choices=sweep.SCOPES, default=list(sweep.SCOPES))
    parser.add_argument("--keep-first", action="store_true", help="leave each network's first conv dense")
    parser.add_argument("--keep-last", action="store_true", help="leave each network's last conv dense")
    parser.add_argument("--sensitive", type=int, default=5,
                        help="list this many most sensitive convs per network (0: skip)")
    parser.add_argument("--sensitivity-sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench_nuclei")
    add_options(parser)
    args = parser.parse_args()

    lines = heading(args.device)
    for data in args.data:
        name = "synthetic" if data == "synthetic" else Path(data).name
        lines += run(args, data, Path(args.out) / name) + [""]
    print("\n".join(lines))
    append_if_asked(lines, args)


if __name__ == "__main__":
    main()
