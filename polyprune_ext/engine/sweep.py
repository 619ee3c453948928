"""Compression-ratio sweeps of magnitude pruning, layer-wise against network-wide, after Mahbod
et al. 2022: at each compression ratio CR (prunable weights / remaining weights), prune the
model's networks with both scopes, fine-tune with the masks held, and measure the task's
metrics (for the nuclei task: the semantic branch's Dice, the regression branch's MSE and the
final instances' AJI and PQ).

The paper's finding to compare against: layer-wise slightly better at small CR, network-wide
better at large CR. ``crossings`` says where the two scopes swap places for each metric.

Gradual mode (the default) walks the ratios in increasing order, each step pruning the previous
point's fine-tuned model further (masks compose); one-shot mode prunes the trained model afresh
at every ratio. Each point's model is written as a compressed checkpoint
(polyprune_ext.unstructured.sparse_checkpoint) with its size against the dense one, and each
row is logged as it comes, so an interrupted sweep resumes where it stopped.
"""

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..choices import Scope
from ..unstructured import magnitude
from ..unstructured.sparse_checkpoint import load_compressed, save_compressed
from .iterative import after_prune
from .report import save_figure
from .task import Metric
from .trainer import FineTuner

CRS = (1, 2, 4, 5, 8, 10, 16, 20, 32, 64)
SCOPES: tuple[Scope, ...] = ("layer", "global")
SCOPE_NAMES = {"layer": "layer-wise", "global": "network-wide"}
Row = dict[str, Any]


def point_path(out_dir: Union[str, Path, None], scope: str, cr: float) -> Path:
    if out_dir is None:
        raise ValueError("resuming a gradual sweep needs the out_dir its points were saved to")
    return Path(out_dir) / f"{scope}-cr{cr:g}.safetensors"


def compression_sweep(tuner: FineTuner, *, crs: Sequence[float] = CRS,
                      scopes: Sequence[Scope] = SCOPES, finetune_epochs: int = 1,
                      finetune_lr: Optional[float] = None, gradual: bool = True,
                      first: bool = True, last: bool = True, biases: bool = False,
                      bn_recal_images: int = 256,
                      out_dir: Union[str, Path, None] = None, rows: Optional[list[Row]] = None,
                      on_row: Optional[Callable[[list[Row]], None]] = None) -> list[Row]:
    """Rows ``{"scope", "cr", "sparsity", <tuner.evaluate() metrics>, "dense_mb",
    "compressed_mb"}`` for every scope and CR. ``tuner.model`` (a NucleiNet, or any model:
    then it is one network) is left as trained. Every network it names (``networks()``) is
    pruned to the same CR, by its own threshold when the scope is network-wide.

    Each point fine-tunes with a fresh AdamW at ``finetune_lr`` (default the training rate),
    cosine over its epochs: a trained model wants a smaller rate than training from scratch, or
    the first steps undo more than the pruning did. ``first``, ``last``, ``biases``: the scope of
    magnitude.prunable_tensors. Before fine-tuning, the BatchNorm statistics are re-estimated on
    ``bn_recal_images`` training images (0: never; the pruned weights move them too), and each
    row also holds the headline metric right after the prune and after the re-calibration.
    ``out_dir``: where each point's compressed checkpoint goes
    (needed to resume a gradual sweep). ``rows``: those logged so far, to resume;
    ``on_row(rows)`` after each new one."""
    if any(cr < 1 for cr in crs):
        raise ValueError(f"compression ratios are at least 1, got {sorted(crs)}")
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"scopes must be among {SCOPES}, got {sorted(unknown)}")
    model = tuner.model
    sweep = _Sweep(tuner, list(model.networks().values()) if hasattr(model, "networks") else [model],
                   copy.deepcopy(model.state_dict()), dict(first=first, last=last, biases=biases),
                   bn_recal_images, out_dir, list(rows or []), on_row)
    try:
        with tuner.checkpoints_paused():  # per-epoch saves would hold the masks
            for scope in scopes:
                sweep.run(scope, sorted(crs), finetune_epochs, finetune_lr, gradual)
    finally:
        magnitude.make_permanent_(model)
        model.load_state_dict(sweep.trained)
    return sweep.rows


@dataclasses.dataclass
class _Sweep:
    tuner: FineTuner
    networks: list[torch.nn.Module]
    trained: dict[str, torch.Tensor]  # the model's state as trained
    options: dict[str, bool]  # first, last, biases: what magnitude pruning covers
    bn_recal_images: int
    out_dir: Union[str, Path, None]
    rows: list[Row]
    on_row: Optional[Callable[[list[Row]], None]]

    def run(self, scope: Scope, crs: list[float], finetune_epochs: int,
            finetune_lr: Optional[float], gradual: bool) -> None:
        """Every CR of one scope, in increasing order; points logged before a resume are skipped."""
        self.restore(None)
        previous = held = None  # the CR last reached in this scope, and the one the model holds
        for cr in crs:
            if any(r["scope"] == scope and r["cr"] == cr for r in self.rows):  # logged before
                previous = cr
                continue
            if not gradual:
                self.restore(None)
            elif previous != held:  # resuming: the model continues from the last point logged
                self.restore(point_path(self.out_dir, scope, previous))
            for network in self.networks:
                magnitude.magnitude_prune_(network, magnitude.sparsity_for(cr), scope=scope,
                                           **self.options)
            self.tuner.restart(finetune_lr)  # the same start for both scopes, recalibration too
            measured = after_prune(self.tuner, self.bn_recal_images)
            self.tuner.fit(finetune_epochs, phase=f"{SCOPE_NAMES[scope]} CR {cr:g}")
            row = {"scope": scope, "cr": cr, "sparsity": _sparsity(self.networks, self.options),
                   **measured, **self.tuner.evaluate()}
            row.update(_save_point(self.tuner.model, self.out_dir, scope, cr))
            self.rows.append(row)
            previous = held = cr
            if self.on_row:
                self.on_row(self.rows)

    def restore(self, path: Optional[Path]) -> None:
        """The model as trained (path None) or as the point saved at ``path``, masks holding
        its zeros."""
        model = self.tuner.model
        magnitude.make_permanent_(model)
        if path is None:
            model.load_state_dict(self.trained)
            return
        if not path.exists():
            raise FileNotFoundError(f"cannot resume the gradual sweep: its last point {path} is missing")
        model.load_state_dict(load_compressed(path))
        for network in self.networks:
            magnitude.hold_zeros_(network, **self.options)


def _sparsity(networks, options) -> float:
    tensors = [t for n in networks for t in magnitude.prunable_tensors(n, **options)]
    return magnitude.sparsity_of(tensors)


def _save_point(model, out_dir, scope, cr) -> dict:
    """Sizes of the point's model on disk, compressed (written to out_dir when given) and dense."""
    state = magnitude.permanent_state_dict(model)
    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            sizes = save_compressed(state, Path(tmp) / "point.safetensors")
    else:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        sizes = save_compressed(state, point_path(out_dir, scope, cr))
    return {"dense_mb": sizes["dense_bytes"] / 2**20, "compressed_mb": sizes["compressed_bytes"] / 2**20}


def _leaders(rows: list[Row], metric: str, higher_is_better: bool) -> list[tuple[float, str]]:
    """(cr, better scope) for every CR at which both scopes have ``metric`` and differ."""
    by_cr = {}
    for r in rows:
        if metric in r:
            by_cr.setdefault(r["cr"], {})[r["scope"]] = r[metric]
    leaders = []
    for cr in sorted(by_cr):
        values = by_cr[cr]
        if len(values) < 2 or values["layer"] == values["global"]:
            continue
        better = (values["global"] > values["layer"]) == higher_is_better
        leaders.append((cr, "global" if better else "layer"))
    return leaders


def crossings(rows: list[Row], metric: str, higher_is_better: bool) -> list[tuple[float, str]]:
    """The CRs at which the better scope for ``metric`` changes, as (cr, now-better scope)."""
    leaders = _leaders(rows, metric, higher_is_better)
    return [(cr, now) for (_, before), (cr, now) in zip(leaders, leaders[1:]) if now != before]


def _present(rows: list[Row], metrics: Sequence[Metric]) -> list[Metric]:
    return [m for m in metrics if any(m.key in r for r in rows)]


def sweep_table(rows: list[Row], metrics: Sequence[Metric]) -> str:
    """Markdown: one line per CR, each metric for both scopes side by side, and sizes."""
    metrics = _present(rows, metrics)
    header = ["CR", "pruned"] + [f"{m.title} ({SCOPE_NAMES[s]})" for m in metrics for s in SCOPES]
    lines = ["| " + " | ".join(header + ["dense MB", "compressed MB (layer, global)"]) + " |",
             "|" + "---|" * (len(header) + 2)]
    by_point = {(r["scope"], r["cr"]): r for r in rows}
    for cr in sorted({r["cr"] for r in rows}):
        cells = [f"{cr:g}", f"{magnitude.sparsity_for(cr):.2%}"]
        for m in metrics:
            for scope in SCOPES:
                r = by_point.get((scope, cr))
                cells.append("-" if r is None or m.key not in r else f"{r[m.key]:.4f}")
        points = [by_point.get((s, cr)) for s in SCOPES]
        dense = next((p["dense_mb"] for p in points if p), None)
        cells.append("-" if dense is None else f"{dense:.1f}")
        cells.append(", ".join("-" if p is None else f"{p['compressed_mb']:.1f}" for p in points))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossing_summary(rows: list[Row], metrics: Sequence[Metric]) -> list[str]:
    """One line per metric: the CRs at which the better scope changes, or the scope that leads
    wherever the two differ."""
    lines = []
    for m in _present(rows, metrics):
        leaders = _leaders(rows, m.key, m.higher_is_better)
        changes = crossings(rows, m.key, m.higher_is_better)
        if changes:
            where = ", ".join(f"{SCOPE_NAMES[s]} ahead from CR {cr:g}" for cr, s in changes)
        elif leaders:
            where = f"{SCOPE_NAMES[leaders[0][1]]} ahead wherever the scopes differ"
        else:
            where = "no CR at which the two scopes differ"
        lines.append(f"- {m.title}: {where}")
    return lines


def plot_sweep(rows: list[Row], metrics: Sequence[Metric], path: Union[str, Path],
               title: str = "") -> bool:
    """A PNG with one panel per metric against CR (log scale), a line per scope, like the
    paper's figures. False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = _present(rows, metrics)
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), dpi=120,
                                squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for scope, style in zip(SCOPES, ("o-", "s--")):
            points = sorted((r["cr"], r[m.key]) for r in rows if r["scope"] == scope and m.key in r)
            if points:
                ax.plot(*zip(*points), style, label=SCOPE_NAMES[scope])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio")
        ax.set_title(m.title)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    if title:
        figure.suptitle(title)
    save_figure(figure, path)
    return True
