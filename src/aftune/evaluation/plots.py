"""PNG plots of the assessment diagnostics (matplotlib, Agg backend, dpi 120).

matplotlib is imported inside each function so that importing aftune never touches a display or
picks a GUI backend; every function returns the path it wrote.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DPI = 120
SCORE_LABEL = "score (nats/token)"
RULE_LABELS = {
    "best_of_k_self": "self-select (top score)",
    "weighted_vote": "score-weighted vote",
    "majority_vote": "majority vote",
    "pass_at_k": "pass@k (oracle)",
}
_LINESTYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P"]  # rules often coincide (e.g. at k=1); markers keep them apart


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # write to a temporary name then rename, so a report never links a half-written image
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def _finite(xs: Sequence[float | None]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def _metric_label(key: str) -> str:
    if "score" in key and "corr" not in key:
        return f"{key}\n{SCORE_LABEL}"
    if key.startswith("ppl"):
        return f"{key}\n(perplexity, exp(-score))"
    return key


def shared_bin_edges(named_scores: dict[str, tuple[Sequence[float], Sequence[float]]], bins: int = 30) -> list[float]:
    """Equal-width bin edges spanning every model's positive and negative scores."""
    allv = [v for pos, neg in named_scores.values() for v in _finite(list(pos) + list(neg))]
    lo, hi = (min(allv), max(allv)) if allv else (-1.0, 0.0)
    if lo == hi:  # a single value still needs a non-empty bin range
        lo, hi = lo - 0.5, hi + 0.5
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


def _axis_unit(key: str) -> str:
    if "score" in key and "corr" not in key:
        return SCORE_LABEL
    if key.startswith("ppl"):
        return "perplexity"
    return "value"


def plot_score_histograms(
    path: str | os.PathLike, named_scores: dict[str, tuple[Sequence[float], Sequence[float]]], bins: int = 30
) -> Path:
    """One subplot per model: positive vs negative candidate scores, same bins and x axis for all.

    Sharing the bins across models is what makes a before/after comparison on the same candidates
    honest (a shift of the whole distribution shows as a shift, not as a re-binning).
    """
    import numpy as np

    plt = pyplot()
    names = list(named_scores) or ["(no models)"]
    edges = shared_bin_edges(named_scores, bins)
    fig, axes = plt.subplots(len(names), 1, sharex=True, squeeze=False, figsize=(7.5, 2.6 * len(names) + 0.8))
    for ax, name in zip(axes[:, 0], names):
        pos, neg = (_finite(v) for v in named_scores.get(name, ([], [])))
        if pos:
            ax.hist(pos, bins=edges, alpha=0.55, color="tab:green", label=f"positive (correct), n={len(pos)}")
            ax.axvline(float(np.mean(pos)), color="tab:green", linestyle="--", linewidth=1)
        if neg:
            ax.hist(neg, bins=edges, alpha=0.55, color="tab:red", label=f"negative (wrong), n={len(neg)}")
            ax.axvline(float(np.mean(neg)), color="tab:red", linestyle="--", linewidth=1)
        if not pos and not neg:
            ax.text(0.5, 0.5, "no scored candidates", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(f"{name}: candidate scores (dashed = mean)")
        ax.set_ylabel("candidates")
        ax.grid(alpha=0.3)
        if pos or neg:
            ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel(f"{SCORE_LABEL}; higher = model prefers it")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_acc_vs_k(
    path: str | os.PathLike, named_curves: dict[str, dict[str, Sequence[Any]]], rules: Sequence[str] | None = None
) -> Path:
    """Accuracy vs k per selection rule: colour per rule, line style per model.

    Each curve dict is `assessment_metrics(...)["acc_vs_k"]`: {"k": [...], rule: [acc, ...]}.
    """
    plt = pyplot()
    if len(named_curves) > MANY_MODELS and rules is None:
        return _plot_self_select_many(plt, path, named_curves)
    rules = list(rules or RULE_LABELS)
    colors = {r: f"C{i}" for i, r in enumerate(rules)}
    markers = {r: _MARKERS[i % len(_MARKERS)] for i, r in enumerate(rules)}
    several = len(named_curves) > 1
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    all_k: set[int] = set()
    for mi, (model, curve) in enumerate(named_curves.items()):
        ks = list(curve.get("k", []))
        for rule in rules:
            ys = curve.get(rule)
            if not ys:
                continue
            pts = [(k, y) for k, y in zip(ks, ys) if y is not None]
            if not pts:
                continue
            all_k.update(k for k, _ in pts)
            label = RULE_LABELS.get(rule, rule) + (f" — {model}" if several else "")
            ax.plot(
                [k for k, _ in pts],
                [100 * y for _, y in pts],
                marker=markers[rule],
                markersize=5,
                markerfacecolor="none",
                color=colors[rule],
                linestyle=_LINESTYLES[mi % len(_LINESTYLES)],
                label=label,
            )
    if all_k:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_k))
        ax.set_xticklabels([str(k) for k in sorted(all_k)])
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no curves", transform=ax.transAxes, ha="center", va="center")
    title = "Accuracy vs number of candidates per question"
    if not several and named_curves:
        title += f" ({next(iter(named_curves))})"
    ax.set_title(title)
    ax.set_xlabel("k (candidates kept per question, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_metric_bars(
    path: str | os.PathLike,
    table: dict[str, dict[str, float | None]],
    metrics: Sequence[str],
    title: str = "Model comparison",
) -> Path:
    """Grouped bars: one group per metric, one bar per model, value printed on each bar.

    Metrics on different scales each get their own subplot row when mixing accuracies (0..1) with
    anything else would squash one of them; a missing value is marked "n/a" instead of a zero bar.
    """
    import numpy as np

    plt = pyplot()
    models = list(table)
    metrics = list(metrics)
    if len(models) > MANY_MODELS:
        return _metric_barh_many(plt, path, table, metrics, title)

    def unit_scale(mt: str) -> bool:
        vals = _finite([table[m].get(mt) for m in models])
        return all(0.0 <= v <= 1.0 for v in vals)

    # accuracy-like metrics share one panel; each other metric gets its own panel (own y scale)
    panels: list[list[str]] = []
    unit = [mt for mt in metrics if unit_scale(mt)]
    if unit:
        panels.append(unit)
    panels += [[mt] for mt in metrics if mt not in unit]
    if not panels:
        panels = [[]]
    widths = [max(1.0, len(p)) for p in panels]
    fig, axes = plt.subplots(
        1,
        len(panels),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
        figsize=(min(12.0, max(6.0, 0.8 * len(models) * len(metrics) + 2.5)), 4.8),
    )
    w = 0.8 / max(1, len(models))
    for ax, pm in zip(axes[0], panels):
        x = np.arange(len(pm))
        for i, model in enumerate(models):
            for j, mt in enumerate(pm):
                v = table[model].get(mt)
                xpos = x[j] - 0.4 + w * (i + 0.5)
                if v is None or not math.isfinite(float(v)):
                    ax.text(xpos, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                    continue
                ax.bar(xpos, float(v), width=w, color=f"C{i}", label=model if j == 0 else None)
                ax.text(xpos, float(v), f"{float(v):.3g}", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(
            [_metric_label(mt) for mt in pm],
            rotation=20 if len(pm) > 2 else 0,
            ha="right" if len(pm) > 2 else "center",
            fontsize=8,
        )
        ax.set_ylabel("fraction (0-1)" if pm is unit else _axis_unit(pm[0]))
        ax.grid(axis="y", alpha=0.3)
        ax.axhline(0, color="black", linewidth=0.6)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes[0, 1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.suptitle(title)
    if handles:  # one row under the title: close to every panel, never over a bar
        fig.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.94),
            ncol=len(handles),
            fontsize=8,
            frameon=False,
        )
    fig.tight_layout(rect=(0, 0, 1, 0.88 if handles else 1))
    return save_figure(fig, path)


MANY_MODELS = 6  # beyond this, one colour per model stops being readable: switch layouts


def _plot_self_select_many(plt, path, named_curves) -> Path:
    """Many models: self-select accuracy vs k, one line per model, plus the (shared) pass@k oracle."""
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    cmap = plt.get_cmap("tab20")
    ks_all: set[int] = set()
    for i, (model, curve) in enumerate(named_curves.items()):
        pts = [(k, y) for k, y in zip(curve.get("k", []), curve.get("best_of_k_self", [])) if y is not None]
        ks_all.update(k for k, _ in pts)
        ax.plot(
            [k for k, _ in pts],
            [100 * y for _, y in pts],
            color=cmap(i % 20),
            marker=_MARKERS[i % len(_MARKERS)],
            markersize=4,
            linestyle=_LINESTYLES[(i // 20) % len(_LINESTYLES)],
            label=model,
        )
    first = next(iter(named_curves.values()))
    oracle = [(k, y) for k, y in zip(first.get("k", []), first.get("pass_at_k", [])) if y is not None]
    if oracle:
        ax.plot(
            [k for k, _ in oracle], [100 * y for _, y in oracle], color="black", linestyle=":", label="pass@k (oracle)"
        )
    if ks_all:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ks_all))
        ax.set_xticklabels([str(k) for k in sorted(ks_all)])
    ax.set_title("Self-select (top own score) accuracy vs k, per model")
    ax.set_xlabel("k (candidates kept per question, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def _metric_barh_many(plt, path, table, metrics, title) -> Path:
    """Many models: one panel per metric, one horizontal bar per model (names on the y axis)."""
    models = list(table)
    fig, axes = plt.subplots(
        1,
        max(1, len(metrics)),
        squeeze=False,
        sharey=True,
        figsize=(min(16.0, 3.0 * max(1, len(metrics)) + 1.5), 0.28 * len(models) + 1.6),
    )
    y = list(range(len(models)))
    for ax, mt in zip(axes[0], metrics):
        vals = [table[m].get(mt) for m in models]
        finite = [float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in vals]
        ax.barh(y, finite, color=["C0" if v is not None else "lightgrey" for v in vals])
        for yi, v in zip(y, vals):
            ax.text(
                0 if v is None else float(v), yi, " n/a" if v is None else f" {float(v):.3f}", va="center", fontsize=7
            )
        ax.set_title(_metric_label(mt), fontsize=9)
        ax.set_xlabel(_axis_unit(mt), fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        lo = min(finite) if finite else 0.0
        ax.set_xlim(min(0.0, lo), max(finite + [0.0]) * 1.18 or 1.0)
    axes[0, 0].set_yticks(y)
    axes[0, 0].set_yticklabels(models, fontsize=8)
    axes[0, 0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training_curves(
    path: str | os.PathLike,
    history: Sequence[dict[str, Any]],
    keys: Sequence[str],
    title: str = "Training diagnostics",
) -> Path:
    """Each diagnostic vs step in its own panel (shared step axis): scales differ across keys."""
    plt = pyplot()
    keys = list(keys) or ["(no keys)"]
    fig, axes = plt.subplots(len(keys), 1, sharex=True, squeeze=False, figsize=(7.5, 2.2 * len(keys) + 0.8))
    for ax, key in zip(axes[:, 0], keys):
        pts = [
            (h["step"], float(h[key]))
            for h in history
            if h.get(key) is not None and h.get("step") is not None and math.isfinite(float(h[key]))
        ]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=key)
            ax.axhline(pts[0][1], color="gray", linestyle=":", linewidth=1, label="first value")
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, f"no values for {key}", transform=ax.transAxes, ha="center", va="center")
        ax.set_ylabel(_metric_label(key), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return save_figure(fig, path)
