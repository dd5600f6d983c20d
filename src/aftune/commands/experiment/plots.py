"""A study's plots under report/plots: accuracy per cell, the paired difference to the control, the difference
against k and beta (grid), and accuracy against compute (arms). The cells are the results writers' entries;
the generic drawing (matplotlib backend, atomic PNG writes) is evaluation.plots'."""

from __future__ import annotations

from pathlib import Path

from aftune.evaluation.plots import pyplot, save_figure


def plot_experiment(root: Path, cells: list[dict], name: str, control_cell: str) -> list[tuple[Path, str]]:
    """An experiment's plots under root/plots: accuracy per cell, the paired difference to the control, and
    the difference vs k and vs beta. Returns (path, caption) pairs for the report."""
    out = [_accuracy_bars(root, cells, name, control_cell)]
    out += _delta_bars(root, cells, name)
    out += _delta_lines(root, cells, control_cell, "k", "accuracy_vs_k.png", "Accuracy vs k", "k")
    out += _delta_lines(
        root,
        cells,
        control_cell,
        "beta",
        "accuracy_vs_beta.png",
        "Accuracy vs beta",
        "beta (nats per token, log scale)",
    )
    return out


def _delta(c: dict) -> tuple[float, float] | None:
    """A cell's difference to the control and its 95% half-width, in points (None: not compared)."""
    t = c.get("vs_control")
    if not t or t["diff"] is None:
        return None
    return 100 * t["diff"], 0.0 if t["ci95"] is None else 50 * (t["ci95"][1] - t["ci95"][0])


def _accuracy_bars(root: Path, cells: list[dict], name: str, control_cell: str) -> tuple[Path, str]:
    plt = pyplot()
    acc = {c["cell"]: c["metrics"]["test_acc"] for c in cells}
    control = acc.get(control_cell, {}).get("mean")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cells) + 2), 4.5))
    names = [c["cell"] for c in cells if acc[c["cell"]]["mean"] is not None]
    ax.bar(
        range(len(names)),
        [100 * acc[n]["mean"] for n in names],
        yerr=[100 * (acc[n]["std"] or 0.0) for n in names],
        capsize=3,
        color=["tab:gray" if n in ("VFT", control_cell) else "tab:blue" for n in names],
    )
    if control is not None:
        ax.axhline(100 * control, color="black", linestyle="--", linewidth=1, label="control mean")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{name}: accuracy per run configuration")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return (
        save_figure(fig, root / "plots" / "accuracy.png"),
        "test accuracy per configuration (error bars: std over seeds)",
    )


def _delta_bars(root: Path, cells: list[dict], name: str) -> list[tuple[Path, str]]:
    """The paired view: seeds differ far more from each other than methods from their seed's control, so the std
    bars of accuracy.png hide what the study measures. Per cell: the difference to the control with its
    question-level 95% interval (evaluation.stats.paired_test), and each seed's own difference as a dot."""
    paired = [(c, _delta(c)) for c in cells if _delta(c) is not None]
    if not paired:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(paired) + 2), 4.5))
    x = range(len(paired))
    colors = [
        "tab:gray" if c["cell"] == "VFT" else "tab:green" if d - e > 0 else "tab:red" if d + e < 0 else "tab:blue"
        for c, (d, e) in paired
    ]  # green / red: the interval excludes 0
    ax.bar(x, [d for _, (d, _) in paired], yerr=[e for _, (_, e) in paired], capsize=3, color=colors)
    for i, (c, _) in enumerate(paired):
        per = [100 * v for v in c["vs_control"]["diff_per_seed"] if v is not None]
        ax.plot([i] * len(per), per, "o", color="black", markersize=3, alpha=0.7)
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xticks(list(x))
    ax.set_xticklabels([c["cell"] for c, _ in paired], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy minus control (points)")
    ax.set_title(f"{name}: difference to the control (bars: question-level 95% CI; dots: seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return [
        (
            save_figure(fig, root / "plots" / "delta_vs_control.png"),
            "difference to the same seed's control (mean over seeds, question-level 95% interval; dots: seeds)",
        )
    ]


def _delta_lines(
    root: Path, cells: list[dict], control_cell: str, axis: str, fname: str, what: str, xlabel: str
) -> list[tuple[Path, str]]:
    """The difference to the control (not raw accuracy: seed spread would swamp it) against `axis` (k or beta),
    one line per setting of the other axes; log x. Nothing when no setting has two values on the axis."""
    groups: dict[tuple, list[tuple[float, tuple[float, float]]]] = {}
    flat: dict[str, tuple[float, float]] = {}
    for c in cells:
        if c["cell"] in ("VFT", control_cell) or _delta(c) is None:
            continue
        if axis == "beta" and c["beta"] is not None and c["beta"].startswith("gap"):
            flat[c["cell"]] = _delta(c)  # a per-question beta has no position on the beta axis
            continue
        x = c["k"] if axis == "k" else (float(c["beta"]) if c["beta"] is not None else None)
        if x is None:
            continue
        key = (c["method"],) + tuple(c[a] for a in ("k", "beta", "lambda") if a != axis)
        groups.setdefault(key, []).append((x, _delta(c)))
    groups = {g: sorted(v, key=lambda p: p[0]) for g, v in groups.items() if len({x for x, _ in v}) > 1}
    if not groups:
        return []
    title = f"{what}: difference to the control"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (g, pts) in enumerate(groups.items()):
        label = " ".join(
            f"{a}={v}"
            for a, v in zip(("method",) + tuple(a for a in ("k", "beta", "lambda") if a != axis), g)
            if v is not None
        )
        ax.errorbar(
            [x for x, _ in pts],
            [d for _, (d, _) in pts],
            yerr=[e for _, (_, e) in pts],
            marker="o",
            capsize=3,
            color=f"C{i % 10}",
            label=label,
        )
    for j, (cell, (d, e)) in enumerate(flat.items()):
        color = f"C{(len(groups) + j) % 10}"
        ax.axhline(d, color=color, linestyle=":", linewidth=1.2, label=f"{cell} (± {e:.1f})")
    ax.axhline(0, color="black", linestyle="--", linewidth=1, label="control")
    ax.set_xscale("log")
    xs = sorted({x for pts in groups.values() for x, _ in pts})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the grid's values, not log-scale decades
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy minus control (points), ± 95% CI")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return [(save_figure(fig, root / "plots" / fname), title)]


def plot_compute(report: Path, arms: list[dict], vft: dict, name: str) -> list[tuple[Path, str]]:
    """Test accuracy against generated tokens and against wall minutes: a line per arm through its points (iterate:
    one per round), error bars = std over seeds, the VFT start dashed."""
    plt = pyplot()
    out = []
    for key, scale, xlabel, fname in (
        ("generated_tokens", 1.0, "generated tokens (mean over seeds)", "accuracy_vs_generated_tokens.png"),
        ("wall_seconds", 1 / 60, "wall minutes, sampling + training (mean over seeds)", "accuracy_vs_wall_time.png"),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, a in enumerate(arms):
            pts = [p for p in a["curve"] if p[key] is not None and p["test_acc"]["mean"] is not None]
            if not pts:
                continue
            ax.errorbar(
                [p[key] * scale for p in pts],
                [100 * p["test_acc"]["mean"] for p in pts],
                yerr=[100 * (p["test_acc"]["std"] or 0.0) for p in pts],
                marker="o",
                capsize=3,
                color=f"C{i % 10}",
                label=a["arm"],
            )
        if vft["test_acc"]["mean"] is not None:
            ax.axhline(100 * vft["test_acc"]["mean"], color="black", linestyle="--", linewidth=1, label="VFT start")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%), ± std over seeds")
        ax.set_title(f"{name}: accuracy vs {'generated tokens' if key == 'generated_tokens' else 'wall time'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append((save_figure(fig, report / "plots" / fname), f"test accuracy vs {xlabel}"))
    return out
