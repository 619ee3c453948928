"""Polyp segmentation on Kvasir-SEG: does pruning pay off, and is TaylorFO the criterion to use?

The fixed 880/120 split; one unpruned model trained from scratch and shared; then, for every seed
(the scoring batches, the re-calibration images and the fine-tuning order):

  - one-shot: the trained model pruned once to -25% and -50% FLOPs, no fine-tuning, the Dice
    right after the prune and after re-estimating the BatchNorm statistics, for every criterion
    (TaylorFO with normalized, loss and random gradients, L1, BN scale, random; Torch-Pruning's
    Taylor and magnitude importance, re-calibrated too), on raw and on per-layer normalised
    scores ranked globally, and with the same fraction from every layer (where only the choice
    of channels inside a layer differs);
  - iterative: --steps equal steps to -50% FLOPs and to -50% predicted latency (the latency
    model of the unpruned network, batch 1 at --latency-size on --latency-threads threads), each
    step re-calibrated and fine-tuned --finetune-epochs, the same budget for every criterion
    (Torch-Pruning only to the FLOPs target: it has no latency target); and the reference: the
    unpruned model fine-tuned as many epochs at the same rate, so that a pruned model's Dice is
    not credited with what the extra training alone gives;
  - latency: every final model and the unpruned one at batch 1, --latency-size, timed
    round-robin in one process (speed.compare), at 1 thread and at all threads.

Tables: mean ± std over the seeds. Every run writes its results as it goes and is skipped when
found finished, so an interrupted benchmark resumes where it stopped (--out keeps them).
Phases: --phases train oneshot iterative latency report (default all; timing wants a quiet
machine, so `latency` can run alone later).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _common import add_options, append_if_asked, heading, setup

import polyprune_ext
from polyprune_ext import model_stats, recalibrate_bn, select_channels, speed
from polyprune_ext.engine import PruneConfig, TrainConfig, Trainer, iterative_prune, report, seed_everything
from polyprune_ext.engine.iterative import step_scores
from polyprune_ext.models import smp_model
from polyprune_ext.structure import prune_, read_plan
from polyprune_ext.tasks.polyp import TASK

# name in the tables -> (criterion, grad), in the library's vocabulary; "tp/..." are Torch-Pruning's
OURS = {"taylor/normalized": ("taylor", "normalized"), "taylor/loss": ("taylor", "loss"),
        "taylor/random": ("taylor", "random"), "l1": ("l1", "normalized"),
        "bn_scale": ("bn_scale", "normalized"), "random": ("random", "normalized")}
THEIRS = ("tp/taylor", "tp/magnitude")
REFERENCE = "unpruned, fine-tuned as long"
# one-shot rankings: one global ranking of raw scores, or of each layer's scores over their L2
# norm; or "uniform": the same fraction from every layer (only the choice inside a layer differs)
WEIGHTINGS = {"raw": "raw, global", "layer": "per-layer normalised, global",
              "uniform": "the same fraction per layer"}


def trainer(model, args, out_dir, seed, plan=None, lr=None):
    """A Trainer on the fixed split, its batch order and augmentations drawn from ``seed``."""
    train, val = TASK.load_data(args.data, size=args.size, val_count=args.val_count, seed=0)
    config = TrainConfig(batch_size=args.batch_size, lr=lr or args.lr, seed=seed)
    return Trainer(model, TASK, train, val, config, device=args.device, out_dir=out_dir, plan=plan,
                   progress=False)


def load_json(path):
    return json.loads(path.read_text()) if path.exists() else {}


def save_json(path, value):
    """Whole or not at all: a kill leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def unpruned(args, out):
    """The trained unpruned checkpoint: trained now unless out/unpruned holds a finished one."""
    directory = out / "unpruned"
    seed_everything(0)
    t = trainer(smp_model(args.arch, args.encoder), args, directory, seed=0)
    if (directory / "train_state.pt").exists():
        t.resume()
    if t.epoch < args.epochs:
        start = time.time()
        t.fit(args.epochs - t.epoch)
        print(f"trained {args.epochs} epochs in {time.time() - start:.0f} s", flush=True)
    return directory / "model.safetensors"


def tp_prune_to(t, args, importance, goal_gflops, batches):
    """Torch-Pruning's MetaPruner, global pruning in 1% steps until the model has at most
    ``goal_gflops``; at most --tp-max-ratio of any layer goes, as with our policy's max_ratio.
    Taylor importance takes the loss gradients of ``batches`` scoring batches before each step."""
    import torch_pruning as tp

    model, example = t.model, torch.zeros(1, 3, args.size, args.size, device=t.device)
    imp = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, global_pruning=True,
                                  pruning_ratio=0.95, iterative_steps=100,
                                  max_pruning_ratio=args.tp_max_ratio,
                                  ignored_layers=[model.segmentation_head])
    while model_stats(model, example).gflops > goal_gflops:
        if importance == "taylor":
            model.zero_grad()
            for i, (x, y) in enumerate(t.batches(t.train_loader)):
                if i == batches:
                    break
                TASK.loss_fn(model(x), y).backward()
        pruner.step()
    model.zero_grad(set_to_none=True)


def one_shot(path, args, out):
    """{f"{name}|{weighting}|{amount}|{seed}": {"pruned": Dice, "recalibrated": Dice}}."""
    log = out / "oneshot.json"
    results = load_json(log)
    base = trainer(polyprune_ext.load(path), args, None, seed=0)
    full = model_stats(base.model, base.plan.example_input()).gflops
    results["unpruned"] = base.evaluate()["dice"]
    for seed in args.seeds:
        for weighting in WEIGHTINGS:
            for name in [*OURS, *(THEIRS if weighting == "raw" and args.torch_pruning else ())]:
                for amount in (0.25, 0.5):
                    key = f"{name}|{weighting}|{amount}|{seed}"
                    if key in results:
                        continue
                    seed_everything(seed)
                    t = trainer(polyprune_ext.load(path), args, None, seed=seed)
                    if name in OURS:
                        criterion, grad = OURS[name]
                        config = PruneConfig(criterion=criterion, grad=grad, score_batches=args.score_batches,
                                             normalize_layers=weighting == "layer", seed=seed)
                        scores = step_scores(t, config, step=0)
                        keep = select_channels(scores.analysis, scores.values, amount=amount, target="flops",
                                               scope="layer" if weighting == "uniform" else "global")
                        prune_(t.model, scores.analysis, keep)
                    else:
                        tp_prune_to(t, args, name.split("/")[1], (1 - amount) * full, args.score_batches)
                    pruned = t.evaluate()["dice"]
                    recalibrate_bn(t.model, t.train_loader, args.bn_recal_images)
                    results[key] = {"pruned": pruned, "recalibrated": t.evaluate()["dice"]}
                    save_json(log, results)
                    print(key, results[key], flush=True)
    return results


def iterative(path, args, out):
    """{f"{name}|{target}|{seed}": rows} of every iterative run (resumed where interrupted),
    and the unpruned model fine-tuned as long under {f"{REFERENCE}|-|{seed}"}."""
    runs = {f"{REFERENCE}|-|{seed}": run_reference(path, args, out / "iterative" / f"reference-seed{seed}", seed)
            for seed in args.seeds}
    for target in args.targets:
        for seed in args.seeds:
            for name in [*OURS, *(THEIRS if target == "flops" and args.torch_pruning else ())]:
                if target == "latency" and args.latency_criteria and name not in args.latency_criteria:
                    continue
                directory = out / "iterative" / f"{name.replace('/', '-')}-{target}-seed{seed}"
                runs[f"{name}|{target}|{seed}"] = run_iterative(path, args, directory, name, target, seed)
    return runs


def run_reference(path, args, directory, seed):
    """[before, after]: the unpruned model fine-tuned --steps x --finetune-epochs at --finetune-lr.
    An interrupted one finishes the rest of its epochs, as the training phase does."""
    log = directory / "rows.json"
    if (directory / "done").exists():
        return json.loads(log.read_text())
    seed_everything(seed)
    t = trainer(polyprune_ext.load(path), args, directory, seed, plan=read_plan(path), lr=args.finetune_lr)
    stats = model_stats(t.model, t.plan.example_input())
    if (directory / "train_state.pt").exists():  # written after each epoch, so the log is there too
        t.resume()
        rows = json.loads(log.read_text())
    else:
        rows = [{"step": 0, "gflops": stats.gflops, **t.evaluate()}]
        save_json(log, rows)
    t.fit(max(0, args.steps * args.finetune_epochs - t.epochs_done("reference")), phase="reference")
    rows.append({"step": args.steps, "gflops": stats.gflops, **t.evaluate()})
    save_json(log, rows)
    (directory / "done").touch()
    print(REFERENCE, seed, rows[-1], flush=True)
    return rows


def run_iterative(path, args, directory, name, target, seed):
    log = directory / "rows.json"
    if (directory / "done").exists():
        return json.loads(log.read_text())
    seed_everything(seed)
    t = trainer(polyprune_ext.load(path), args, directory, seed, plan=read_plan(path), lr=args.finetune_lr)
    if name in THEIRS:
        rows = [{"step": 0, **t.evaluate()}]
        full = model_stats(t.model, t.plan.example_input()).gflops
        for step in range(1, args.steps + 1):
            tp_prune_to(t, args, name.split("/")[1], full * 0.5 ** (step / args.steps), args.score_batches)
            measured = {"dice_pruned": t.evaluate()["dice"]}
            recalibrate_bn(t.model, t.train_loader, args.bn_recal_images)
            measured["dice_recalibrated"] = t.evaluate()["dice"]
            t.restart(args.finetune_lr)
            t.fit(args.finetune_epochs, phase=f"tp step {step}")
            stats = model_stats(t.model, t.plan.example_input())
            rows.append({"step": step, "params": stats.params, "gflops": stats.gflops, **measured, **t.evaluate()})
        torch.save(t.model, directory / "model.pt")  # Torch-Pruning's pruned modules: no plan to replay
    else:
        rows = None
        if log.exists() and (directory / "train_state.pt").exists():
            t.resume()
            rows = json.loads(log.read_text())
        criterion, grad = OURS[name]
        config = PruneConfig(target=target, amount=0.5, steps=args.steps, criterion=criterion, grad=grad,
                             score_batches=args.score_batches, normalize_layers=args.weighting == "layer",
                             bn_recal_images=args.bn_recal_images, finetune_epochs=args.finetune_epochs,
                             latency_threads=args.latency_threads, latency_size=args.latency_size, seed=seed)
        rows = iterative_prune(t, config, rows=rows,
                               on_step=lambda rows: report.write_rows(rows, directory, "rows"))
    save_json(log, rows)
    (directory / "done").touch()
    print(name, target, seed, rows[-1], flush=True)
    return rows


def final_model(directory):
    if (directory / "model.pt").exists():
        return torch.load(directory / "model.pt", weights_only=False)  # our own Torch-Pruning file
    return polyprune_ext.load(directory / "model.safetensors")


def latencies(path, args, out, runs):
    """{threads: {key: speed row}}: every final model and the unpruned one, round-robin (all
    again when a model was added: timings taken an hour apart on this machine differed by 40%)."""
    log = out / "latency.json"
    results = load_json(log)
    models = {"unpruned": polyprune_ext.load(path)}
    for key in runs:
        name, target, seed = key.split("|")
        if name == REFERENCE:
            continue  # the unpruned network: timed once, above
        models[key] = final_model(out / "iterative" / f"{name.replace('/', '-')}-{target}-seed{seed}")
    for threads in sorted({1, torch.get_num_threads()}):
        if set(results.get(str(threads), {})) != set(models):
            results[str(threads)] = speed.compare(models, batch=1, size=args.latency_size, threads=threads,
                                                  warmup=3, repeats=5, max_repeats=40, tolerance=0.02)
            save_json(log, results)
    return results


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def one_shot_table(results, args):
    lines = [f"Unpruned Dice {results['unpruned']:.4f}. One prune, no fine-tuning; mean ± std over seeds "
             f"{args.seeds}.", "",
             "| criterion | ranking | Dice at -25% FLOPs | re-calibrated | Dice at -50% FLOPs | re-calibrated |",
             "|---|---|---|---|---|---|"]
    for weighting, label in WEIGHTINGS.items():
        for name in [*OURS, *(THEIRS if weighting == "raw" else ())]:
            cells = []
            for amount in (0.25, 0.5):
                found = [results.get(f"{name}|{weighting}|{amount}|{s}") for s in args.seeds]
                if not any(found):
                    break
                cells += [mean_std([f["pruned"] for f in found if f]),
                          mean_std([f["recalibrated"] for f in found if f])]
            if cells:
                lines.append(f"| {name} | {label if name in OURS else 'its own'} | " + " | ".join(cells) + " |")
    return lines


def iterative_table(runs, lat, args):
    base_row = next(iter(runs.values()))[0]
    threads = sorted(lat, key=int)
    lines = [f"Unpruned: Dice {base_row['dice']:.4f}, {base_row['gflops']:.2f} GFLOPs at {args.size} px; latency at "
             f"batch 1, {args.latency_size} px: " + ", ".join(f"{lat[t]['unpruned']['ms']:.1f} ms ({t} thread(s))"
                                                            for t in threads), "",
             "| criterion | target | GFLOPs | Dice after the last prune | re-calibrated | Dice | Dice change | "
             + " | ".join(f"ms ({t} thr) | speed-up ({t} thr)" for t in threads) + " |",
             "|---|---|---|---|---|---|---|" + "---|---|" * len(threads)]
    for target in ["-", *args.targets]:
        for name in [REFERENCE] if target == "-" else [*OURS, *THEIRS]:
            keys = [f"{name}|{target}|{s}" for s in args.seeds if f"{name}|{target}|{s}" in runs]
            if not keys:
                continue
            last = [runs[k][-1] for k in keys]
            cells = [mean_std([r["gflops"] for r in last]), mean_std([r.get("dice_pruned") for r in last]),
                     mean_std([r.get("dice_recalibrated") for r in last]), mean_std([r["dice"] for r in last]),
                     mean_std([r["dice"] - base_row["dice"] for r in last])]
            for t in threads:
                ms = [lat[t]["unpruned" if name == REFERENCE else k]["ms"] for k in keys
                      if name == REFERENCE or k in lat[t]]
                cells += [mean_std(ms), mean_std([lat[t]["unpruned"]["ms"] / m for m in ms])]
            lines.append(f"| {name} | {'-50% ' + target if target != '-' else '-'} | " + " | ".join(cells) + " |")
    return lines + ["", *prediction_table(runs, lat, args)]


def prediction_table(runs, lat, args):
    """The latency model against the measurement, at the thread count it was built for: the
    milliseconds, and the speed-up over the unpruned network (what a latency target sets; it
    holds when the whole machine runs faster or slower than when the model was measured)."""
    measured = lat.get(str(args.latency_threads), {})
    predicted = {k: rows for k, rows in runs.items() if "predicted_ms" in rows[-1] and k in measured}
    if not predicted:
        return []
    first = next(iter(predicted.values()))[0]["predicted_ms"]
    pairs = [("unpruned", first, measured["unpruned"]["ms"])]
    pairs += [(k, rows[-1]["predicted_ms"], measured[k]["ms"]) for k, rows in predicted.items()]
    _, p0, m0 = pairs[0]
    return [f"Latency model against measurement ({args.latency_threads} thread(s), batch 1, "
            f"{args.latency_size} px):", "",
            "| model | predicted ms | measured ms | error | predicted speed-up | measured | error |",
            "|---|---|---|---|---|---|---|",
            *(f"| {k} | {p:.1f} | {m:.1f} | {p / m - 1:+.1%} | {p0 / p:.2f}x | {m0 / m:.2f}x | "
              f"{(p0 / p) / (m0 / m) - 1:+.1%} |" for k, p, m in pairs)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/kvasir-seg")
    parser.add_argument("--val-count", type=int, default=120)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=128, help="training and evaluation side")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="training from scratch")
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2, help="iterative pruning steps")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="after each step")
    parser.add_argument("--score-batches", type=int, default=8)
    parser.add_argument("--bn-recal-images", type=int, default=256)
    parser.add_argument("--weighting", choices=("raw", "layer"), default="raw",
                        help="the iterative runs' scores: raw, or each layer's over their L2 norm")
    parser.add_argument("--targets", nargs="+", choices=("flops", "latency"), default=["flops", "latency"],
                        help="the iterative runs' targets (latency ones measure a latency model: "
                        "run them on a quiet machine)")
    parser.add_argument("--latency-size", type=int, default=352)
    parser.add_argument("--latency-threads", type=int, default=1, help="the latency target's deployment")
    parser.add_argument("--latency-criteria", nargs="+", choices=list(OURS), default=None,
                        help="only these to the latency target (default: all; each run takes minutes)")
    parser.add_argument("--torch-pruning", action="store_true")
    parser.add_argument("--tp-max-ratio", type=float, default=0.9)
    parser.add_argument("--phases", nargs="+", default=["train", "oneshot", "iterative", "latency", "report"],
                        choices=["train", "oneshot", "iterative", "latency", "report"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench_polyp")
    add_options(parser)
    args = parser.parse_args()
    setup(args)
    out = Path(args.out)
    start = time.time()
    path = unpruned(args, out)
    shots = one_shot(path, args, out) if "oneshot" in args.phases or "report" in args.phases else None
    runs = iterative(path, args, out) if {"iterative", "latency", "report"} & set(args.phases) else None
    lat = latencies(path, args, out, runs) if {"latency", "report"} & set(args.phases) else None
    if "report" not in args.phases:
        return
    lines = heading(args.device) + [
        f"### Polyp segmentation, Kvasir-SEG (880/120), {args.arch}-{args.encoder} at {args.size}x{args.size}, "
        f"{args.epochs} epochs from scratch (shared); seeds {args.seeds}; {args.score_batches} scoring batches, "
        f"BatchNorm re-calibration on {args.bn_recal_images} images; this invocation {time.time() - start:.0f} s",
        "", "#### One-shot", "", *one_shot_table(shots, args), "",
        f"#### Iterative: {args.steps} steps to -50%, {args.finetune_epochs} fine-tuning epoch(s) each at lr "
        f"{args.finetune_lr:g}, {args.weighting} scores", "", *iterative_table(runs, lat, args)]
    print("\n".join(lines))
    append_if_asked(lines, args)


if __name__ == "__main__":
    main()
