"""PNG plots of the benchmark tables (matplotlib on the Agg backend, when it is installed)."""
from __future__ import annotations

from typing import Dict, List, Optional


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a one-line note) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, path: str, title: str = "", dpi: int = 120) -> str:
    """Writes `fig` (with `title` above its panels) to the PNG `path` and closes it; returns `path`."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_kernel_speedup(rows: List[dict], path: str, title: str = "") -> Optional[str]:
    """Speedup vs sparsity, one line per block size (and backend), one panel per op; per-layer conv rows
    are left out (their total is a panel)."""
    ops_shown = [op for op in dict.fromkeys(r["op"] for r in rows) if op != "conv_fwd_bwd"]
    if not ops_shown:
        return None
    plt = pyplot()
    if plt is None:
        return None
    backends = {r["backend"] for r in rows}
    fig, axes = plt.subplots(1, len(ops_shown), figsize=(4.5 * len(ops_shown), 3.8), squeeze=False)
    for ax, op in zip(axes[0], ops_shown):
        series: Dict[str, List[tuple]] = {}
        for r in rows:
            if r["op"] == op:
                label = f"block {r['block']}" + (f" ({r['backend']})" if len(backends) > 1 else "")
                series.setdefault(label, []).append((float(r["sparsity"]), float(r["speedup"])))
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speedup over dense (x)")
        ax.legend(fontsize=8)
    return save_figure(plt, fig, path, title)


def plot_e2e(rows: List[dict], path: str, title: str = "") -> Optional[str]:
    """Images/s of dense, simulated and ours, grouped by sparsity, one panel per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return None
    plt = pyplot()
    if plt is None:
        return None
    methods = ["dense", "simulated", "ours"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        sparsities = sorted({float(r["sparsity"]) for r in mine})
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            rate = {float(r["sparsity"]): float(r["images_per_s"]) for r in mine if r["method"] == method}
            xs = [j + (i - 1) * width for j in range(len(sparsities))]
            ax.bar(xs, [rate.get(s, 0.0) for s in sparsities], width, label=method)
        ax.set_xticks(range(len(sparsities)), [f"{s:.0%}" for s in sparsities])
        ax.set_xlabel("sparsity")
        ax.set_ylabel("training images/s")
        first = mine[0]
        ax.set_title(f"{model}, {first['input']}, batch {first['batch']}", fontsize=10)
        ax.legend(fontsize=8)
    return save_figure(plt, fig, path, title)


