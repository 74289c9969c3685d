"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Save atomically: temp file in the same directory, then rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, p)
    return p


def plot_report(report: dict, path: str | os.PathLike) -> Path:
    """Bars of an `evaluate` report: accuracy per task (model / reference / base), KL per task, perplexity."""
    plt = _pyplot()
    tasks = report.get("tasks", {})
    names = list(tasks)
    has_kl = any("kl" in tasks[n] for n in names)
    ppl = report.get("perplexity")
    panels = (1 if names else 0) + (1 if has_kl else 0) + (1 if ppl else 0)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(4.5 * max(1, panels), 3.6), squeeze=False)
    axes = list(axes[0])
    ax_i = 0
    if names:
        ax = axes[ax_i]
        ax_i += 1
        series = [(k, lbl) for k, lbl in (("base", "base"), ("model", "model"), ("reference", "reference")) if any(k in tasks[n] for n in names)]
        width = 0.8 / max(1, len(series))
        for j, (key, label) in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
            ys = [tasks[n][key]["accuracy"] if key in tasks[n] else 0.0 for n in names]
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("exact-match accuracy")
        ax.legend(fontsize=8)
    if has_kl:
        ax = axes[ax_i]
        ax_i += 1
        ys = [tasks[n]["kl"]["kl"] if "kl" in tasks[n] else 0.0 for n in names]
        bars = ax.bar(range(len(names)), ys, color="tab:red")
        ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel("KL(reference || model), nats/token")
    if ppl:
        ax = axes[ax_i]
        labels = [k for k in ("model", "reference") if k in ppl]
        ys = [ppl[k]["ppl"] for k in labels]
        bars = ax.bar(labels, ys, color=["tab:blue", "tab:green"][: len(labels)])
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7)
        ax.set_ylabel(f"perplexity ({Path(ppl.get('file', '')).name})")
    title = Path(str(report.get("target", ""))).name
    if "delta" in report:
        d = report["delta"]
        title += f"  [{d['method']}, true ratio {d['true_ratio']:.1f}x]"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    p = _save(fig, path)
    plt.close(fig)
    return p
