"""Pruning logs as files people read: CSV and JSON rows, a Dice-against-FLOPs plot, a markdown
report. Each file is written to a temporary name and renamed, so a crash leaves the previous one."""

import csv
import io
import json
from pathlib import Path

COLUMNS = [("step", "step", "{}"), ("params", "params (M)", "{:.2f}"), ("gflops", "GFLOPs", "{:.2f}"),
           ("dice", "Dice", "{:.4f}"), ("iou", "IoU", "{:.4f}"), ("ms", "latency ms", "{:.1f}"),
           ("fps", "FPS", "{:.1f}")]


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path``, whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_rows(rows: list, out_dir, name: str = "pruning_log") -> None:
    """``name``.csv and ``name``.json in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_dir / f"{name}.csv", buffer.getvalue())
    write_text(out_dir / f"{name}.json", json.dumps(rows, indent=1))


def table(rows: list) -> str:
    """A markdown table of the rows, in the units people compare (M params, GFLOPs, ms)."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
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


def plot_dice_against_flops(rows: list, path, title: str = "") -> bool:
    """A PNG of validation Dice against GFLOPs, one point per pruning step. False (and nothing
    written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    axes.plot([r["gflops"] for r in rows], [r["dice"] for r in rows], "o-")
    for r in rows:
        axes.annotate(str(r["step"]), (r["gflops"], r["dice"]), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel("GFLOPs per image")
    axes.set_ylabel("validation Dice")
    axes.set_title(title or "Dice against FLOPs, pruning step by step")
    axes.grid(alpha=0.3)
    save_figure(figure, path)
    return True


def save_figure(figure, path) -> None:
    """Lay out, write to a temporary name, rename (a crash leaves the previous file), close."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)


def before_after(rows: list) -> str:
    """The unpruned and the final model side by side, with the change."""
    first, last = rows[0], rows[-1]
    change = {"params": last["params"] / first["params"] - 1, "gflops": last["gflops"] / first["gflops"] - 1,
              "dice": last["dice"] - first["dice"], "iou": last["iou"] - first["iou"]}
    if "ms" in first and "ms" in last:
        change["ms"] = last["ms"] / first["ms"] - 1
    lines = [table([dict(first, step="unpruned"), dict(last, step=f"pruned ({last['step']} steps)")]), "",
             f"Change: params {change['params']:+.1%}, GFLOPs {change['gflops']:+.1%}, "
             f"Dice {change['dice']:+.4f}, IoU {change['iou']:+.4f}"
             + (f", latency {change['ms']:+.1%} (speed-up {first['ms'] / last['ms']:.2f}x)" if "ms" in change else "")]
    return "\n".join(lines)


def write_report(rows: list, out_dir, heading: str, details: list) -> Path:
    """report.md: heading, details (lines), the before/after table and every step."""
    path = Path(out_dir) / "report.md"
    text = [f"# {heading}", "", *details, "", "## Before and after", "", before_after(rows), "",
            "## Every step", "", table(rows), ""]
    write_text(path, "\n".join(text))
    return path
