"""The polyprune command: train, prune, eval, bench and demo for polyp segmentation, and
nuclei train / sweep for nuclei instance segmentation with magnitude pruning.

    polyprune demo                                   # synthetic data, CPU, about 5 minutes
    polyprune train --data ../kvasir-seg --out runs/unet
    polyprune prune --checkpoint runs/unet --data ../kvasir-seg --reduction 0.5 --out runs/pruned
    polyprune eval --checkpoint runs/pruned --data ../kvasir-seg
    polyprune bench --checkpoint runs/pruned --size 352
    polyprune nuclei train --data ../dsb2018 --out runs/nuclei
    polyprune nuclei sweep --checkpoint runs/nuclei --data ../dsb2018 --out runs/sweep

--data takes a Kvasir-SEG / CVC-ClinicDB style folder (images/ and masks/ with matching names),
or "synthetic" (the default: generated polyps, fixed seed). A checkpoint is a directory holding
model.safetensors and its pruning plan (model.safetensors.plan.json), as train and prune write.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from . import checkpoint, magnitude, report, speed, sweep
from .data import polyp_dataset
from .iterative import CRITERIA, PruneConfig, iterative_prune
from .training import TrainConfig, Trainer, build_model, seed_everything


def add_data_options(p, size=352, data_help="images/ + masks/ folder, or 'synthetic' (default)"):
    p.add_argument("--data", default="synthetic", help=data_help)
    p.add_argument("--size", type=int, default=size, help="input side in pixels (default %(default)s)")
    p.add_argument("--val-count", type=int, default=None,
                   help="validation images (default: 12%% of the set; Kvasir-SEG benchmarks use 120)")
    p.add_argument("--synthetic-count", type=int, default=240, help="images in the synthetic set")
    p.add_argument("--seed", type=int, default=0, help="split, initialisation and shuffling seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def datasets(args):
    common = dict(size=args.size, val_count=args.val_count, seed=args.seed)
    if args.data == "synthetic":
        common["count"] = args.synthetic_count
    source = None if args.data == "synthetic" else args.data
    return (polyp_dataset(source, split="train", augment=True, **common),
            polyp_dataset(source, split="val", **common))


def trainer_for(model, args, out, plan=None):
    train_set, val_set = datasets(args)
    config = TrainConfig(epochs=getattr(args, "epochs", 0), batch_size=args.batch_size, lr=args.lr,
                         workers=args.workers, seed=args.seed)
    return Trainer(model, train_set, val_set, config, device=args.device, out_dir=out, plan=plan,
                   progress=not args.no_progress)


def load_checkpoint(directory):
    path = Path(directory) / "model.safetensors"
    if not path.exists():
        raise SystemExit(f"no checkpoint at {path}: pass the --out directory of `polyprune train`")
    return checkpoint.load(path), checkpoint.read_plan(path)


def latency_columns(args, size):
    """Batch-1 fp32 latency on the run's device: the column every log row carries."""
    def measure(model):
        row = speed.latency(model, batch=1, size=size, device=args.device, warmup=3, repeats=10)
        return {"ms": row["ms"], "fps": row["fps"]}
    return measure


def cmd_train(args):
    seed_everything(args.seed)
    out = Path(args.out)
    trainer = trainer_for(build_model(args.arch, args.encoder), args, out)
    if args.resume:
        trainer.resume()
        print(f"resumed at epoch {trainer.epoch}", file=sys.stderr)
    records = trainer.fit(max(0, args.epochs - trainer.epoch)) if args.epochs > trainer.epoch else []
    for r in records:
        print(json.dumps(r))
    print(json.dumps({"checkpoint": str(out / "model.safetensors"), **trainer.evaluate()}))


def cmd_prune(args):
    seed_everything(args.seed)
    model, plan = load_checkpoint(args.checkpoint)
    out = Path(args.out)
    trainer = trainer_for(model, args, out, plan=plan)
    if args.method == "magnitude":
        if args.resume:
            raise SystemExit("--resume continues iterative (taylor) pruning; magnitude is one-shot")
        return prune_magnitude(trainer, args, out)
    config = PruneConfig(target=args.target, reduction=args.reduction, step=args.step,
                         criterion="taylor" if args.criterion in ("normalized", "loss", "taylor-random")
                         else args.criterion,
                         grad={"taylor-random": "random"}.get(args.criterion, args.criterion),
                         score_batches=args.score_batches, finetune_epochs=args.finetune_epochs,
                         round_to=args.round_to, normalize_layers=args.normalize_layers,
                         flops_weighted=args.flops_weighted, seed=args.seed)
    rows = None
    if args.resume:
        if not (out / "pruning_log.json").exists() or not (out / "train_state.pt").exists():
            raise SystemExit(f"nothing to resume in {out}: no pruning_log.json and train_state.pt")
        trainer.resume()
        rows = json.loads((out / "pruning_log.json").read_text())
        print(f"resumed after step {rows[-1]['step']}, epoch {trainer.epoch}", file=sys.stderr)
    run_pruning(trainer, config, args, out, heading="TaylorFO structured pruning", rows=rows)


def run_pruning(trainer, config, args, out, heading, rows=None):
    """Iterative pruning with logs, plot and report written as it goes; prints the table."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    rows = iterative_prune(trainer, config, measure=latency_columns(args, args.size),
                           on_step=lambda rows: report.write_rows(rows, out), rows=rows)
    plotted = report.plot_dice_against_flops(rows, out / "dice_vs_flops.png")
    details = [f"- command: `polyprune {' '.join(sys.argv[1:])}`",
               f"- data: {args.data}, {args.size}x{args.size}, device {args.device}",
               f"- pruning: {json.dumps(dataclasses.asdict(config))}",
               f"- wall time: {time.time() - start:.0f} s",
               "- plot: dice_vs_flops.png" if plotted else "- plot: matplotlib is not installed"]
    path = report.write_report(rows, out, heading, details)
    print(report.before_after(rows))
    print(f"\nreport: {path}; log: {out / 'pruning_log.csv'}; model: {out / 'model.safetensors'}"
          + (f"; plot: {out / 'dice_vs_flops.png'}" if plotted else ""))
    return rows


def prune_magnitude(trainer, args, out):
    """Unstructured magnitude pruning to --sparsity in one shot, fine-tuned with the masks held,
    then made permanent."""
    before = trainer.evaluate()
    reached = magnitude.magnitude_prune_(trainer.model, args.sparsity, scope=args.scope)
    trainer.out_dir = None  # no checkpoints while the masks are held: they would not load
    trainer.fit(args.finetune_epochs, phase="fine-tune")
    magnitude.make_permanent_(trainer.model)
    trainer.out_dir = out
    trainer.save()
    after = trainer.evaluate()
    print(json.dumps({"sparsity": reached, "before": before, "after": after}, indent=1))


def nuclei_trainer(model, args, out, plan=None):
    from .nuclei import NucleiMetrics, nuclei_datasets, nuclei_loss

    common = dict(size=args.size, val_count=args.val_count, seed=args.seed)
    if args.data == "synthetic":
        common["count"] = args.synthetic_count
    train_set, val_set = nuclei_datasets(None if args.data == "synthetic" else args.data, **common)
    config = TrainConfig(epochs=getattr(args, "epochs", 0), batch_size=args.batch_size, lr=args.lr,
                         workers=args.workers, seed=args.seed)
    return Trainer(model, train_set, val_set, config, device=args.device, out_dir=out, plan=plan,
                   progress=not args.no_progress, loss_fn=nuclei_loss, metrics=NucleiMetrics)


def cmd_nuclei_train(args):
    from .nuclei import NucleiNet

    seed_everything(args.seed)
    out = Path(args.out)
    model = NucleiNet(args.arch, args.encoder, shared_encoder=args.shared_encoder)
    trainer = nuclei_trainer(model, args, out)
    if args.resume:
        trainer.resume()
    trainer.fit(max(0, args.epochs - trainer.epoch))
    print(json.dumps({"checkpoint": str(out / "model.safetensors"), **trainer.evaluate()}, indent=1))


def cmd_nuclei_sweep(args):
    seed_everything(args.seed)
    model, plan = load_checkpoint(args.checkpoint)
    out = Path(args.out)
    trainer = nuclei_trainer(model, args, None, plan=plan)
    rows = None
    if args.resume and (out / "sweep.json").exists():
        rows = json.loads((out / "sweep.json").read_text())
        print(f"resuming after {len(rows)} points", file=sys.stderr)
    start = time.time()
    rows = sweep.compression_sweep(
        trainer, crs=args.crs, scopes=args.scopes, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, gradual=not args.one_shot, first=not args.keep_first,
        last=not args.keep_last, biases=args.biases, out_dir=out / "points", rows=rows,
        on_row=lambda rows: report.write_rows(rows, out, "sweep"))
    plotted = sweep.plot_sweep(rows, out / "sweep.png")
    text = ["# Magnitude pruning sweep: layer-wise against network-wide", "",
            f"- command: `polyprune {' '.join(sys.argv[1:])}`",
            f"- data: {args.data}, {args.size}x{args.size}; {args.finetune_epochs} fine-tuning epochs "
            f"per point at lr {args.finetune_lr:g}, {'one-shot' if args.one_shot else 'gradual'}; "
            f"{time.time() - start:.0f} s",
            "", sweep.sweep_table(rows), "", *sweep.crossing_summary(rows), ""]
    report.write_text(out / "sweep.md", "\n".join(text))
    print("\n".join(text[4:]))
    print(f"\nreport: {out / 'sweep.md'}; log: {out / 'sweep.csv'}"
          + (f"; plot: {out / 'sweep.png'}" if plotted else ""))


def cmd_eval(args):
    model, plan = load_checkpoint(args.checkpoint)
    trainer = trainer_for(model, args, None, plan=plan)
    print(json.dumps(trainer.evaluate(), indent=1))


def cmd_bench(args):
    model = load_checkpoint(args.checkpoint)[0] if args.checkpoint else build_model(args.arch, args.encoder)
    rows = speed.speed_table(model, size=args.size, batches=(1, args.batch_size), device=args.device)
    print(speed.format_table(rows))
    verdict = "real-time" if speed.is_real_time(rows, size=args.size) else "not real-time"
    print(f"\n{verdict} on {args.device} (>= {speed.REAL_TIME_FPS} FPS at batch 1, {args.size}x{args.size})")


def cmd_demo(args):
    """Train a small Unet on synthetic polyps, prune it to -50% FLOPs with fine-tuning, and
    print the before/after table; everything on this machine, a few minutes on 2 CPU cores."""
    seed_everything(args.seed)
    out = Path(args.out)
    trainer = trainer_for(build_model(args.arch, args.encoder), args, out / "trained")
    trainer.fit(args.epochs)
    trainer.out_dir = out / "pruned"
    config = PruneConfig(reduction=args.reduction, step=args.step, score_batches=args.score_batches,
                         finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                         seed=args.seed)
    run_pruning(trainer, config, args, out / "pruned", heading="polyprune demo: TaylorFO pruning on synthetic polyps")


def parser():
    main = argparse.ArgumentParser(prog="polyprune", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = main.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an smp model from scratch (encoder_weights=None)")
    add_data_options(p)
    p.add_argument("--arch", default="Unet", help="smp architecture (default %(default)s)")
    p.add_argument("--encoder", default="resnet34", help="smp encoder (default %(default)s)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", required=True, help="directory for checkpoints (written every epoch)")
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("prune", help="prune a trained checkpoint, with fine-tuning")
    add_data_options(p)
    p.add_argument("--checkpoint", required=True, help="directory written by train (or prune)")
    p.add_argument("--out", required=True, help="directory for the pruned model, log, plot, report")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from --out's checkpoint and pruning log")
    p.add_argument("--method", choices=("taylor", "magnitude"), default="taylor",
                   help="taylor: structured, filters removed (faster); magnitude: unstructured zeros")
    p.add_argument("--criterion", default="normalized",
                   choices=("normalized", "loss", "taylor-random") + CRITERIA[1:],
                   help="structured importance: TaylorFO with gradient-normalized (default), plain "
                        "loss or random-output gradients; or l1, l2, bn_scale, random baselines")
    p.add_argument("--target", choices=("flops", "params"), default="flops")
    p.add_argument("--reduction", type=float, default=0.5, help="fraction of the target to remove")
    p.add_argument("--step", type=float, default=0.2, help="fraction of remaining channels per step")
    p.add_argument("--score-batches", type=int, default=8, help="batches scored per step")
    p.add_argument("--finetune-epochs", type=int, default=3, help="epochs after each step")
    p.add_argument("--round-to", type=int, default=1, help="keep multiples of this many channels")
    # Fine-tuning a trained model wants a smaller rate than training it (Kvasir-SEG, resnet18:
    # 1.4 Dice points better at 3e-4 than at 1e-3 after a -50% FLOPs prune).
    p.set_defaults(lr=3e-4)
    p.add_argument("--normalize-layers", action="store_true",
                   help="divide each layer's scores by their L2 norm before the global ranking")
    p.add_argument("--flops-weighted", action="store_true",
                   help="rank channels by score per FLOP they cost (suits a FLOPs target)")
    p.add_argument("--sparsity", type=float, default=0.9, help="magnitude: fraction of weights zeroed")
    p.add_argument("--scope", choices=("global", "layer"), default="global",
                   help="magnitude: one network-wide threshold, or the same sparsity per layer")
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("eval", help="Dice, IoU, precision and recall of a checkpoint")
    add_data_options(p)
    p.add_argument("--checkpoint", required=True)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("bench", help="latency and FPS, and whether the model is real-time")
    add_data_options(p)
    p.add_argument("--checkpoint", help="directory written by train or prune")
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet34")
    p.set_defaults(run=cmd_bench)

    nuclei = sub.add_parser("nuclei", help="nuclei instance segmentation: train, magnitude sweep")
    nuclei_sub = nuclei.add_subparsers(dest="nuclei_command", required=True)
    nuclei_data_help = ("DSB2018 folder (<id>/images, <id>/masks), images/ + labels/ folder, or "
                        "'synthetic' (default)")
    p = nuclei_sub.add_parser("train", help="train the two-branch model (mask + distance map)")
    add_data_options(p, size=256, data_help=nuclei_data_help)
    p.set_defaults(synthetic_count=200)
    p.add_argument("--arch", default="Unet", help="smp architecture of each branch")
    p.add_argument("--encoder", default="resnet34", help="smp encoder of each branch")
    p.add_argument("--shared-encoder", action="store_true", help="one encoder, two decoders")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", required=True, help="directory for checkpoints (written every epoch)")
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    p.set_defaults(run=cmd_nuclei_train)

    p = nuclei_sub.add_parser("sweep", help="magnitude pruning at each compression ratio, "
                              "layer-wise and network-wide, fine-tuned; table, plot, report")
    add_data_options(p, size=256, data_help=nuclei_data_help)
    p.set_defaults(synthetic_count=200)
    p.add_argument("--checkpoint", required=True, help="directory written by `nuclei train`")
    p.add_argument("--out", required=True, help="directory for the log, plot, report and points")
    p.add_argument("--crs", type=float, nargs="+", default=list(sweep.CRS),
                   help="compression ratios: prunable weights / remaining weights")
    p.add_argument("--scopes", nargs="+", choices=("layer", "global"), default=["layer", "global"])
    p.add_argument("--finetune-epochs", type=int, default=2, help="epochs after each pruning")
    p.add_argument("--finetune-lr", type=float, default=3e-4,
                   help="learning rate of each point's fine-tuning (default %(default)s)")
    p.add_argument("--one-shot", action="store_true",
                   help="prune the trained model afresh at each CR (default: gradually)")
    p.add_argument("--keep-first", action="store_true", help="leave the first conv of each network dense")
    p.add_argument("--keep-last", action="store_true", help="leave the last conv of each network dense")
    p.add_argument("--biases", action="store_true", help="prune conv biases too")
    p.add_argument("--resume", action="store_true", help="continue from --out's sweep.json")
    p.set_defaults(run=cmd_nuclei_sweep)

    p = sub.add_parser("demo", help="train and prune a small Unet on synthetic polyps (CPU, minutes)")
    add_data_options(p, size=128)
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--reduction", type=float, default=0.5)
    p.add_argument("--step", type=float, default=0.25)
    p.add_argument("--score-batches", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="after training at --lr")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(run=cmd_demo)
    return main


def main(argv=None):
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
