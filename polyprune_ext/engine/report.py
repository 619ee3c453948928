"""Pruning logs as files people read: CSV and JSON rows, a metric-against-FLOPs plot, a markdown
report. Each file is written to a temporary name and renamed, so a crash leaves the previous one."""

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence, Union

from .. import _io
from .task import Metric

Row = dict[str, Any]
PathLike = Union[str, Path]


def write_rows(rows: list[Row], out_dir: PathLike, name: str = "pruning_log") -> None:
    """``name``.csv and ``name``.json in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    _io.write_text(out_dir / f"{name}.csv", buffer.getvalue())
    _io.write_text(out_dir / f"{name}.json", json.dumps(rows, indent=1))


def _columns(metrics: Sequence[Metric]) -> list[tuple[str, str, str]]:
    """(row key, title, format) of the columns people compare, in order."""
    headline = metrics[0]
    return [("step", "step", "{}"), ("params", "params (M)", "{:.2f}"), ("gflops", "GFLOPs", "{:.2f}"),
            ("predicted_ms", "predicted ms", "{:.1f}"),
            (f"{headline.key}_pruned", f"{headline.title} after the prune", "{:.4f}"),
            (f"{headline.key}_recalibrated", f"{headline.title} re-calibrated", "{:.4f}"),
            *((m.key, m.title, "{:.4f}") for m in metrics),
            ("ms", "latency ms", "{:.1f}"), ("fps", "FPS", "{:.1f}")]


def table(rows: list[Row], metrics: Sequence[Metric]) -> str:
    """A markdown table of the rows, in the units people compare (M params, GFLOPs, ms)."""
    columns = [c for c in _columns(metrics) if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            value = r.get(key)
            value = value / 1e6 if key == "params" and value is not None else value
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_against_flops(rows: list[Row], metric: Metric, path: PathLike, title: str = "") -> bool:
    """A PNG of ``metric`` against GFLOPs, one point per pruning step. False (and nothing
    written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    axes.plot([r["gflops"] for r in rows], [r[metric.key] for r in rows], "o-")
    for r in rows:
        axes.annotate(str(r["step"]), (r["gflops"], r[metric.key]), textcoords="offset points",
                      xytext=(4, 4))
    axes.set_xlabel("GFLOPs per image")
    axes.set_ylabel(f"validation {metric.title}")
    axes.set_title(title or f"{metric.title} against FLOPs, pruning step by step")
    axes.grid(alpha=0.3)
    save_figure(figure, path)
    return True


def save_figure(figure: Any, path: PathLike) -> None:
    """Lay out, write whole (a temporary name, then a rename), close."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    try:
        _io.replace_atomically(path, lambda tmp: figure.savefig(tmp, format=path.suffix[1:]))
    finally:
        plt.close(figure)


def before_after(rows: list[Row], metrics: Sequence[Metric]) -> str:
    """The unpruned and the final model side by side, with the change."""
    first, last = rows[0], rows[-1]
    changes = [f"params {last['params'] / first['params'] - 1:+.1%}",
               f"GFLOPs {last['gflops'] / first['gflops'] - 1:+.1%}",
               *(f"{m.title} {last[m.key] - first[m.key]:+.4f}" for m in metrics)]
    if "ms" in first and "ms" in last:
        changes.append(f"latency {last['ms'] / first['ms'] - 1:+.1%} (speed-up "
                       f"{first['ms'] / last['ms']:.2f}x)")
    pair = [dict(first, step="unpruned"), dict(last, step=f"pruned ({last['step']} steps)")]
    return "\n".join([table(pair, metrics), "", "Change: " + ", ".join(changes)])


def write_report(rows: list[Row], metrics: Sequence[Metric], out_dir: PathLike, heading: str,
                 details: list[str]) -> Path:
    """report.md: heading, details (lines), the before/after table and every step."""
    path = Path(out_dir) / "report.md"
    text = [f"# {heading}", "", *details, "", "## Before and after", "",
            before_after(rows, metrics), "", "## Every step", "", table(rows, metrics), ""]
    _io.write_text(path, "\n".join(text))
    return path
