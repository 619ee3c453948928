"""Compression-ratio sweeps of magnitude pruning, layer-wise against network-wide, after Mahbod
et al. 2022: at each compression ratio CR (prunable weights / remaining weights), prune the
nuclei model's networks with both scopes, fine-tune with the masks held, and measure the semantic
branch (Dice), the regression branch (MSE) and the final instances (AJI, PQ).

The paper's finding to compare against: layer-wise slightly better at small CR, network-wide
better at large CR. ``crossings`` says where the two scopes swap places for each metric.

Gradual mode (the default) walks the ratios in increasing order, each step pruning the previous
point's fine-tuned model further (masks compose); one-shot mode prunes the trained model afresh
at every ratio. Each point's model is written as a compressed checkpoint
(polyprune_ext.sparse_checkpoint) with its size against the dense one, and each row is logged as
it comes, so an interrupted sweep resumes where it stopped.
"""

import copy
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from . import magnitude
from .report import save_figure
from .sparse_checkpoint import load_compressed, save_compressed
from .training import seed_everything

CRS = (1, 2, 4, 5, 8, 10, 16, 20, 32, 64)
SCOPES = ("layer", "global")
SCOPE_NAMES = {"layer": "layer-wise", "global": "network-wide"}
# metric key, title, whether higher is better
METRICS = (("dice", "semantic Dice", True), ("mse", "regression MSE", False),
           ("aji", "instance AJI", True), ("pq", "instance PQ", True))


def point_path(out_dir, scope: str, cr: float) -> Path:
    if out_dir is None:
        raise ValueError("resuming a gradual sweep needs the out_dir its points were saved to")
    return Path(out_dir) / f"{scope}-cr{cr:g}.safetensors"


def compression_sweep(trainer, *, crs=CRS, scopes=SCOPES, finetune_epochs: int = 1,
                      finetune_lr: Optional[float] = None, gradual: bool = True,
                      first: bool = True, last: bool = True, biases: bool = False, out_dir=None,
                      rows: Optional[list] = None, on_row: Optional[Callable] = None) -> list:
    """Rows ``{"scope", "cr", "sparsity", <trainer.evaluate() metrics>, "dense_mb",
    "compressed_mb"}`` for every scope and CR. ``trainer.model`` (a NucleiNet, or any model:
    then it is one network) is left as trained. Every network it names (``networks()``) is
    pruned to the same CR, by its own threshold when the scope is network-wide.

    Each point fine-tunes with a fresh AdamW at ``finetune_lr`` (default the trainer's), cosine
    over its epochs: a trained model wants a smaller rate than training from scratch, or the
    first steps undo more than the pruning did. ``first``, ``last``, ``biases``: the scope of
    magnitude.prunable_tensors. ``out_dir``: where each point's compressed checkpoint goes
    (needed to resume a gradual sweep). ``rows``: those logged so far, to resume;
    ``on_row(rows)`` after each new one."""
    if any(cr < 1 for cr in crs):
        raise ValueError(f"compression ratios are at least 1, got {sorted(crs)}")
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"scopes must be among {SCOPES}, got {sorted(unknown)}")
    model = trainer.model
    networks = list(model.networks().values()) if hasattr(model, "networks") else [model]
    options = dict(first=first, last=last, biases=biases)
    trained = copy.deepcopy(model.state_dict())
    saved_dir, trainer.out_dir = trainer.out_dir, None  # its per-epoch saves would hold the masks
    rows = list(rows or [])
    try:
        for scope in scopes:
            _restore(model, networks, trained, None, options)
            previous = held = None  # the CR last reached in this scope, and the one the model holds
            for cr in sorted(crs):
                if any(r["scope"] == scope and r["cr"] == cr for r in rows):  # logged before a resume
                    previous = cr
                    continue
                if not gradual:
                    _restore(model, networks, trained, None, options)
                elif previous != held:  # resuming: the model continues from the last point logged
                    _restore(model, networks, trained, point_path(out_dir, scope, previous), options)
                for network in networks:
                    magnitude.magnitude_prune_(network, magnitude.sparsity_for(cr), scope=scope, **options)
                lr = trainer.config.lr if finetune_lr is None else finetune_lr
                trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=lr,
                                                      weight_decay=trainer.config.weight_decay)
                _same_start(trainer)
                trainer.fit(finetune_epochs, phase=f"{SCOPE_NAMES[scope]} CR {cr:g}")
                row = {"scope": scope, "cr": cr, "sparsity": _sparsity(networks, options),
                       **trainer.evaluate()}
                row.update(_save_point(model, out_dir, scope, cr))
                rows.append(row)
                previous = held = cr
                if on_row:
                    on_row(rows)
    finally:
        trainer.out_dir = saved_dir
        magnitude.make_permanent_(model)
        model.load_state_dict(trained)
    return rows


def _same_start(trainer) -> None:
    """Every point fine-tunes from the same random state (batch order, augmentations), so the two
    scopes at a CR differ by their masks alone, and a resumed sweep repeats the points it lost."""
    seed_everything(trainer.config.seed)
    trainer.train_loader.generator.manual_seed(trainer.config.seed)


def _restore(model, networks, trained, path, options) -> None:
    """The model as trained (path None) or as the point saved at ``path``, masks holding its
    zeros."""
    magnitude.make_permanent_(model)
    if path is None:
        model.load_state_dict(trained)
        return
    if not path.exists():
        raise FileNotFoundError(f"cannot resume the gradual sweep: its last point {path} is missing")
    model.load_state_dict(load_compressed(path))
    for network in networks:
        magnitude.hold_zeros_(network, **options)


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


def _leaders(rows: list, metric: str, higher_is_better: bool) -> list:
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


def crossings(rows: list, metric: str, higher_is_better: bool) -> list:
    """The CRs at which the better scope for ``metric`` changes, as (cr, now-better scope)."""
    leaders = _leaders(rows, metric, higher_is_better)
    return [(cr, now) for (_, before), (cr, now) in zip(leaders, leaders[1:]) if now != before]


def sweep_table(rows: list) -> str:
    """Markdown: one line per CR, each metric for both scopes side by side, and sizes."""
    metrics = [m for m in METRICS if any(m[0] in r for r in rows)]
    header = ["CR", "pruned"] + [f"{title} ({SCOPE_NAMES[s]})" for _, title, _ in metrics for s in SCOPES]
    lines = ["| " + " | ".join(header + ["dense MB", "compressed MB (layer, global)"]) + " |",
             "|" + "---|" * (len(header) + 2)]
    by_point = {(r["scope"], r["cr"]): r for r in rows}
    for cr in sorted({r["cr"] for r in rows}):
        cells = [f"{cr:g}", f"{magnitude.sparsity_for(cr):.2%}"]
        for key, _, _ in metrics:
            for scope in SCOPES:
                r = by_point.get((scope, cr))
                cells.append("-" if r is None or key not in r else f"{r[key]:.4f}")
        points = [by_point.get((s, cr)) for s in SCOPES]
        dense = next((p["dense_mb"] for p in points if p), None)
        cells.append("-" if dense is None else f"{dense:.1f}")
        cells.append(", ".join("-" if p is None else f"{p['compressed_mb']:.1f}" for p in points))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossing_summary(rows: list) -> list:
    """One line per metric: the CRs at which the better scope changes, or the scope that leads
    wherever the two differ."""
    lines = []
    for key, title, higher in METRICS:
        if not any(key in r for r in rows):
            continue
        leaders, changes = _leaders(rows, key, higher), crossings(rows, key, higher)
        if changes:
            where = ", ".join(f"{SCOPE_NAMES[s]} ahead from CR {cr:g}" for cr, s in changes)
        elif leaders:
            where = f"{SCOPE_NAMES[leaders[0][1]]} ahead wherever the scopes differ"
        else:
            where = "no CR at which the two scopes differ"
        lines.append(f"- {title}: {where}")
    return lines


def plot_sweep(rows: list, path, title: str = "") -> bool:
    """A PNG with one panel per metric against CR (log scale), a line per scope, like the
    paper's figures. False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = [m for m in METRICS if any(m[0] in r for r in rows)]
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), dpi=120,
                                squeeze=False)
    for ax, (key, label, _) in zip(axes[0], metrics):
        for scope, style in zip(SCOPES, ("o-", "s--")):
            points = sorted((r["cr"], r[key]) for r in rows if r["scope"] == scope and key in r)
            if points:
                ax.plot(*zip(*points), style, label=SCOPE_NAMES[scope])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    if title:
        figure.suptitle(title)
    save_figure(figure, path)
    return True
