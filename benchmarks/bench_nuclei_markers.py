"""Why pruning loses the nuclei instances, from a finished bench_nuclei sweep: its saved points
re-evaluated on the same validation images, nothing trained.

For every point (scope, CR) of --sweep (a bench_nuclei output folder for one data set, whose
points/ it reads):
  - which branch costs the instances: AJI (default markers) with the semantic network from the
    point and the regression network from the CR 1 point of the same scope (the same
    fine-tuning, nothing pruned), and the other way round;
  - the regression network's peaks: each true nucleus's highest predicted distance (the targets
    peak at exactly 1), as the median and the share under 0.5, the marker threshold of
    watershed_instances(h=None): a nucleus whose peak stays under it gets no marker and is lost;
  - AJI and PQ of the whole point with those threshold markers and with h-maxima markers of each
    --h (0.1 is the library's default), which do not depend on how high a peak is, only on how
    far it rises above its surroundings.
Then the largest CR at which the AJI stays within 2% of the CR 1 point, per marker choice.
"""

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from _common import add_options, append_if_asked, heading, setup
from bench_nuclei import largest_cr_within, trainer

from polyprune_ext.engine import sweep
from polyprune_ext.tasks.nuclei import TASK, NucleiMetrics, NucleiNet
from polyprune_ext.unstructured.sparse_checkpoint import load_compressed


def mixed(semantic: dict, regression: dict) -> dict:
    """A NucleiNet state with each network taken from its own state."""
    return {k: (semantic if k.startswith("semantic.") else regression)[k] for k in semantic}


class MarkerMetrics:
    """From one pass over the validation images: NucleiMetrics under each marker choice, and
    each true nucleus's highest predicted distance."""

    def __init__(self, markers: dict):
        self.each = {name: NucleiMetrics(watershed=watershed) for name, watershed in markers.items()}
        self.peaks: list = []

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        for metrics in self.each.values():
            metrics.update(output, target)
        distance, labels = output[:, 1].cpu().numpy(), target[:, 2].long().cpu().numpy()
        for d, true in zip(distance, labels):
            self.peaks += [d[true == i].max() for i in np.unique(true) if i]

    def compute(self) -> dict:
        return {"markers": {name: m.compute() for name, m in self.each.items()}, "peaks": np.array(self.peaks)}


def evaluate(t, state: dict, markers: dict) -> dict:
    t.model.load_state_dict(state)
    t.task = dataclasses.replace(TASK, metrics=lambda: MarkerMetrics(markers))
    return t.evaluate()


def run(args) -> list[str]:
    t, _, n_val = trainer(NucleiNet(args.arch, args.encoder), args, args.data, None)
    markers = {"threshold 0.5": {"h": None}, **{f"h {h:g}": {"h": h} for h in args.h}}
    header = ("| scope | CR | AJI, semantic pruned only | AJI, regression pruned only | median peak | "
              "peaks < 0.5 | " + " | ".join(f"AJI / PQ, {m}" for m in markers) + " |")
    lines, rows = [header, "|---" * (6 + len(markers)) + "|"], []
    for scope in args.scopes:
        saved = {cr: sweep.point_path(args.sweep / "points", scope, cr) for cr in args.crs}
        base = load_compressed(sweep.point_path(args.sweep / "points", scope, 1))
        for cr in sorted(cr for cr, path in saved.items() if path.exists()):
            point = load_compressed(saved[cr])
            semantic_only = evaluate(t, mixed(point, base), {"default": {}})["markers"]["default"]["aji"]
            regression_only = evaluate(t, mixed(base, point), {"default": {}})["markers"]["default"]["aji"]
            whole = evaluate(t, point, markers)
            heights = whole["peaks"]
            row = {"scope": scope, "cr": cr}
            for name, r in whole["markers"].items():
                row[f"aji {name}"], row[f"pq {name}"] = r["aji"], r["pq"]
            rows.append(row)
            lines.append(f"| {sweep.SCOPE_NAMES[scope]} | {cr:g} | {semantic_only:.4f} | {regression_only:.4f} | "
                         f"{np.median(heights):.3f} | {(heights < 0.5).mean():.0%} | "
                         + " | ".join(f"{row[f'aji {m}']:.4f} / {row[f'pq {m}']:.4f}" for m in markers) + " |")
            print(lines[-1], flush=True)
    lines.append("")
    for scope in args.scopes:
        control = next((r for r in rows if r["scope"] == scope and r["cr"] == 1), None)
        if control:
            lines.append(f"- {sweep.SCOPE_NAMES[scope]}: AJI within 2% of CR 1 up to CR: " + ", ".join(
                f"{m} {largest_cr_within(rows, control[f'aji {m}'], f'aji {m}', True, scope) or 'none'}"
                for m in markers) + " (target: CR 5)")
    return [f"### Nuclei instances of {args.sweep}'s points, {n_val} validation images of {args.data} "
            f"at {args.size}x{args.size}", ""] + lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, required=True,
                        help="a bench_nuclei output folder for one data set (its points/ are read)")
    parser.add_argument("--data", default="../shared/data/dsb2018-stage1-test", help="the sweep's data")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--val-count", type=int, default=None)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--scopes", nargs="+", choices=sweep.SCOPES, default=list(sweep.SCOPES))
    parser.add_argument("--crs", type=float, nargs="+", default=list(sweep.CRS))
    parser.add_argument("--h", type=float, nargs="+", default=[0.1, 0.2], help="h-maxima marker heights")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_options(parser)
    args = parser.parse_args()
    setup(args)
    if not (args.sweep / "points").is_dir():
        parser.error(f"{args.sweep} holds no points/ folder: give a bench_nuclei output folder for one data set")
    lines = heading(args.device) + run(args)
    print("\n".join(lines))
    append_if_asked(lines, args)


if __name__ == "__main__":
    main()
