"""Polyp segmentation on real data: Dice, IoU and latency of pruned against unpruned models.

Kvasir-SEG (../shared/data/kvasir-seg), a fixed split (--val-count 120 of 1000, seed 0). The
unpruned model is trained from scratch once (its checkpoint is reused when the directory holds
one). Every pruned model starts from that checkpoint with a fresh AdamW and the same budget:
--steps steps, each removing the same share of FLOPs, --finetune-epochs after each; the
score-based criteria rank channels with the same --weighting. Rows:
  - the control: the unpruned model fine-tuned on the same schedule, nothing removed (what the
    extra epochs alone change);
  - normalized TaylorFO at every --reductions (-25%, -50%, -75% FLOPs by default);
  - at -50%: loss TaylorFO, random-gradient TaylorFO, L1 magnitude, random;
  - at -50%, with --torch-pruning: Torch-Pruning's Taylor and L1 magnitude importance on the same
    model, pruned to the same FLOPs after each step as our normalized run, with the same
    fine-tuning (benchmark-only install: pip install ../shared/wheels/torch_pruning-*.whl).
With --one-shot, instead: every criterion, with raw and per-layer normalised scores, prunes the
trained model once to each --reductions, with no fine-tuning, and the table gives the Dice each
keeps: what the criterion alone is worth.
Latency: batch 1 at --size, fp32, on --device, measured at the end for every final model in
turn, --latency-rounds times round-robin after one untimed round (each a median of 10 after
warm-up), so that all models see the same machine; the median over rounds is reported. Prints a table and appends it to
benchmarks/RESULTS.md.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _common import add_options, append_if_asked, heading

import polyprune_ext
from polyprune_ext import model_stats, select_channels, speed
from polyprune_ext.engine import PruneConfig, TrainConfig, Trainer, iterative_prune, report, seed_everything
from polyprune_ext.engine.iterative import step_scores
from polyprune_ext.models import smp_model
from polyprune_ext.tasks.metrics import dice_bce_loss
from polyprune_ext.tasks.polyp import TASK

# name in the tables -> (criterion, grad), in the library's vocabulary
CRITERIA = {"taylor/normalized": ("taylor", "normalized"), "taylor/loss": ("taylor", "loss"),
            "taylor/random": ("taylor", "random"), "l1": ("l1", "normalized"),
            "random": ("random", "normalized")}


def trainer(model, args, out_dir, plan=None, lr=None):
    """A Trainer on the benchmark's split; ``lr``: AdamW's rate (default --lr, for training)."""
    train, val = TASK.load_data(args.data, size=args.size, val_count=args.val_count, seed=0)
    config = TrainConfig(batch_size=args.batch_size, lr=lr or args.lr, seed=0)
    return Trainer(model, TASK, train, val, config, device=args.device, out_dir=out_dir, plan=plan,
                   progress=False)


def latencies(models, args):
    """Batch-1 milliseconds of each model, measured round-robin (see the module docstring)."""
    times = {key: [] for key in models}
    for round in range(args.latency_rounds + 1):  # the first round warms the machine up, untimed
        for key, model in models.items():
            row = speed.latency(model, batch=1, size=args.size, device=args.device, warmup=3, repeats=10)
            if round:
                times[key].append(row["ms"])
    return {key: statistics.median(t) for key, t in times.items()}


def row_of(t, step, example):
    stats = model_stats(t.model, example)
    return {"step": step, "params": stats.params, "gflops": stats.gflops, **t.evaluate()}


def unpruned(args, out):
    """The trained unpruned checkpoint: trained now unless out/unpruned holds a finished one."""
    directory = out / "unpruned"
    seed_everything(0)
    t = trainer(smp_model(args.arch, args.encoder), args, directory)
    if (directory / "train_state.pt").exists():
        t.resume()
    if t.epoch < args.epochs:
        start = time.time()
        t.fit(args.epochs - t.epoch)
        print(f"trained {args.epochs} epochs in {time.time() - start:.0f} s", flush=True)
    return directory / "model.safetensors"


def control(path, args, out):
    """The unpruned model fine-tuned like the pruned ones (--steps phases of --finetune-epochs,
    each with a fresh cosine schedule); resumes from out/control. (rows, model)."""
    directory = out / "control"
    seed_everything(0)
    t = trainer(polyprune_ext.load(path), args, directory, plan=polyprune_ext.structure.read_plan(path),
                lr=args.finetune_lr)
    example = t.plan.example_input(t.device)
    first = row_of(t, 0, example)
    if (directory / "train_state.pt").exists():
        t.resume()
    for step in range(1, args.steps + 1):
        phase = f"control step {step}"
        t.fit(max(0, args.finetune_epochs - t.epochs_done(phase)), phase=phase)
    return [first, row_of(t, args.steps, example)], t.model


def ours(path, args, out, name, reduction):
    """One pruning run in out/NAME-REDUCTION; a run interrupted (or finished) before resumes from
    its rows.json and checkpoint, so a crash costs at most the step in progress. (rows, model)."""
    directory = out / f"{name.replace('/', '-')}-{reduction}"
    log = directory / "rows.json"  # written by report.write_rows, whole or not at all
    seed_everything(0)
    t = trainer(polyprune_ext.load(path), args, directory, plan=polyprune_ext.structure.read_plan(path),
                lr=args.finetune_lr)
    rows = None
    if log.exists() and (directory / "train_state.pt").exists():
        t.resume()
        rows = json.loads(log.read_text())
    criterion, grad = CRITERIA[name]
    config = PruneConfig(amount=reduction, steps=args.steps, criterion=criterion, grad=grad,
                         score_batches=args.score_batches, finetune_epochs=args.finetune_epochs,
                         normalize_layers=args.weighting in ("layers", "both"),
                         flops_weighted=args.weighting in ("flops", "both"))
    rows = iterative_prune(t, config, rows=rows,
                           on_step=lambda rows: report.write_rows(rows, directory, "rows"))
    return rows, t.model


def torch_pruning(path, args, out, importance, milestones):
    """Torch-Pruning's MetaPruner, global pruning in small steps until each milestone (the GFLOPs
    of our normalized run after each step), fine-tuned like ours after each; at most
    --tp-max-ratio of any layer goes, as with our policy's max_ratio."""
    import torch_pruning as tp

    seed_everything(0)
    t = trainer(polyprune_ext.load(path), args, None, lr=args.finetune_lr)
    model, example = t.model, torch.zeros(1, 3, args.size, args.size, device=t.device)
    imp = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, global_pruning=True,
                                  pruning_ratio=0.95, iterative_steps=200,
                                  max_pruning_ratio=args.tp_max_ratio,
                                  ignored_layers=[model.segmentation_head])
    rows = [row_of(t, 0, example)]
    for step, goal in enumerate(milestones, 1):
        while model_stats(model, example).gflops > goal:
            if importance == "taylor":  # gradients of the loss over the scoring batches
                model.zero_grad()
                for i, (x, y) in enumerate(t.batches(t.train_loader)):
                    if i == args.score_batches:
                        break
                    dice_bce_loss(model(x), y).backward()
            pruner.step()
        t.restart(args.finetune_lr)
        pruned = t.evaluate()["dice"]
        t.fit(args.finetune_epochs, phase=f"tp step {step}")
        rows.append({**row_of(t, step, example), "dice_pruned": pruned})
    return rows, model


def one_shot(path, args):
    """Markdown rows: the validation Dice after one prune of the trained model to each reduction,
    no fine-tuning, for every criterion, on raw and on per-layer normalised scores."""
    t = trainer(polyprune_ext.load(path), args, None)
    dice = t.evaluate()["dice"]
    rows = ["| criterion | scores | " + " | ".join(f"Dice at -{r:.0%} FLOPs" for r in args.reductions) + " |",
            "|---|---|" + "---|" * len(args.reductions),
            "| unpruned | - | " + " | ".join(f"{dice:.4f}" for _ in args.reductions) + " |"]
    for normalize_layers in (False, True):
        for name, (criterion, grad) in CRITERIA.items():
            seed_everything(0)
            t.model = polyprune_ext.load(path).to(t.device)
            config = PruneConfig(criterion=criterion, grad=grad, score_batches=args.score_batches,
                                 normalize_layers=normalize_layers)
            scores = step_scores(t, config, step=0)
            cells = []
            for reduction in args.reductions:
                t.model = polyprune_ext.load(path).to(t.device)
                keep = select_channels(scores.analysis, scores.values, amount=reduction, target="flops")
                polyprune_ext.structure.prune_(t.model, scores.analysis, keep)
                cells.append(f"{t.evaluate()['dice']:.4f}")
            rows.append(f"| {name} | {'per-layer normalised' if normalize_layers else 'raw'} | "
                        + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/kvasir-seg")
    parser.add_argument("--val-count", type=int, default=120)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="training from scratch")
    parser.add_argument("--finetune-lr", type=float, default=3e-4,
                        help="AdamW's rate for every fine-tuning run (the control's too)")
    parser.add_argument("--steps", type=int, default=3, help="pruning steps, each removing the same "
                        "fraction of FLOPs (the same schedule for every criterion)")
    parser.add_argument("--score-batches", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA)[1:], choices=list(CRITERIA)[1:],
                        help="compared with normalized TaylorFO at -50%% FLOPs")
    parser.add_argument("--weighting", choices=("none", "flops", "layers", "both"), default="layers",
                        help="how the score-based criteria rank channels globally: raw scores, "
                        "each layer's scores over their L2 norm (the default; raw scores took most "
                        "of the deep layers), per FLOP one channel costs, or both")
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--one-shot", action="store_true",
                        help="only compare the criteria on one prune without fine-tuning")
    parser.add_argument("--torch-pruning", action="store_true")
    parser.add_argument("--tp-max-ratio", type=float, default=0.9,
                        help="Torch-Pruning's max_pruning_ratio per layer (its own default is 1.0; "
                        "0.9 is our policy's max_ratio)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench_polyp")
    add_options(parser)
    args = parser.parse_args()

    out = Path(args.out)
    start = time.time()
    path = unpruned(args, out)
    if args.one_shot:
        rows = one_shot(path, args)
        report = heading(args.device) + [
            f"### Polyp segmentation, {args.data}, {args.arch}-{args.encoder} at {args.size}x{args.size}, "
            f"{args.epochs} epochs from scratch; one prune to each FLOPs target, no fine-tuning; "
            f"{args.score_batches} scoring batches; {time.time() - start:.0f} s in all", "", *rows]
        print("\n".join(report))
        append_if_asked(report, args)
        return
    results, models = {}, {}

    def record(key, run):
        results[key], models[key] = run
        print(json.dumps({key[0]: key[1], **results[key][-1]}), flush=True)

    record(("control (unpruned, same fine-tuning)", 0.0), control(path, args, out))
    for reduction in args.reductions:
        record(("taylor/normalized", reduction), ours(path, args, out, "taylor/normalized", reduction))
    for name in args.criteria:
        record((name, 0.5), ours(path, args, out, name, 0.5))
    if args.torch_pruning and ("taylor/normalized", 0.5) in results:
        milestones = [r["gflops"] for r in results[("taylor/normalized", 0.5)][1:]]
        for importance in ("taylor", "magnitude"):
            record((f"Torch-Pruning {importance}", 0.5), torch_pruning(path, args, out, importance, milestones))
    base = dict(next(iter(results.values()))[0])
    models[("unpruned", 0.0)] = polyprune_ext.load(path).to(args.device)
    ms = latencies(models, args)
    base["ms"] = ms[("unpruned", 0.0)]
    for key, rows in results.items():
        rows[-1]["ms"] = ms[key]
    report = heading(args.device) + [
        f"### Polyp segmentation, {args.data}, {args.arch}-{args.encoder} at {args.size}x{args.size}, "
        f"{args.epochs} epochs from scratch; {args.steps} pruning steps, each removing the same share of FLOPs, "
        f"{args.finetune_epochs} fine-tuning epochs after each at lr {args.finetune_lr:g}; weighting {args.weighting}; "
        f"{time.time() - start:.0f} s in all", "",
        "| criterion | FLOPs target | steps | params (M) | GFLOPs | Dice after last prune | Dice | IoU | Dice change | latency ms (batch 1) | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| unpruned | - | - | {base['params'] / 1e6:.2f} | {base['gflops']:.2f} | - | {base['dice']:.4f} | {base['iou']:.4f} | - | "
        f"{base['ms']:.1f} | 1.00x |"]
    for (name, reduction), rows in results.items():
        r = rows[-1]
        pruned = "-" if r.get("dice_pruned") is None else f"{r['dice_pruned']:.4f}"
        report.append(f"| {name} | {f'-{reduction:.0%}' if reduction else '-'} | {r['step']} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {pruned} | {r['dice']:.4f} | "
                      f"{r['iou']:.4f} | {r['dice'] - base['dice']:+.4f} | {r['ms']:.1f} | {base['ms'] / r['ms']:.2f}x |")
    print("\n".join(report))
    append_if_asked(report, args)


if __name__ == "__main__":
    main()
