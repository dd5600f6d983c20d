"""One `report.md` per pipeline run: every step's outputs, configs, the metrics table and plots.

It only reads what the steps wrote (metrics.json, eval/*.json, assess/assessment.json, the
candidates' meta file), so it can be regenerated at any time and shows nothing that was not measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aftune.evaluation.plots import plot_training_curves
from aftune.evaluation.report import markdown_image, markdown_table, write_report


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _link(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return f"[{rel}]({rel})"


def main_table(out: Path, models: dict[str, str]) -> list[dict]:
    assess = (_load(out / "assess" / "assessment.json") or {}).get("models", {})
    rows = []
    for name in models:
        ev = _load(out / "eval" / f"{name}.json") or {}
        a = assess.get(name, {})
        rows.append(
            {
                "model": name,
                "test_acc": ev.get("accuracy"),
                "n_test": ev.get("n"),
                "assess_acc_macro": a.get("assessment_acc_macro"),
                "assess_acc_micro": a.get("assessment_acc_micro"),
                "self_rerank": a.get("best_of_k_self"),
                "ppl_pos": a.get("ppl_positive"),
                "ppl_neg": a.get("ppl_negative"),
                "ppl_ref": a.get("ppl_reference"),
            }
        )
    return rows


def write_run_report(out: str | Path, models: dict[str, str], plan: Any = None, timings: dict | None = None) -> Path:
    out = Path(out)
    sections: list[tuple[str, str]] = []
    rows = main_table(out, models)
    fmt = {c: ".1%" for c in ("test_acc", "assess_acc_macro", "assess_acc_micro", "self_rerank")}
    fmt.update({c: ".4f" for c in ("ppl_pos", "ppl_neg", "ppl_ref")})
    sections.append(
        (
            "Results",
            markdown_table(rows, list(rows[0]) if rows else ["model"], fmt)
            + """
- **test_acc**: greedy-decoding accuracy on the test split (`eval/<model>.json`, per-question predictions next to it).
- **assess_acc**: assessment accuracy — the fraction of (correct, wrong) candidate pairs the model scores
  correct-above-wrong, on held-out questions' candidates sampled from the VFT model (macro: mean over
  questions; micro: pooled pairs). **self_rerank**: accuracy when the model picks its own top-scored candidate.
- **ppl_pos / ppl_neg / ppl_ref**: mean perplexity (exp of minus the per-token log-likelihood) of correct
  candidates, wrong candidates and reference solutions.
- **control** continues VFT for the same steps on the same NLL batches without the alignment term: an AFT
  gain counts only where it beats the control.""",
        )
    )

    stats = _load(Path(str(out / "candidates.jsonl") + ".meta.json"))
    if stats:
        s = stats.get("stats", stats)
        keys = ["questions", "candidates", "frac_correct", "distinct_correct_per_question", "frac_mixed", "wall_s"]
        sections.append(
            (
                "Sampled candidates (training questions)",
                markdown_table([{k: s.get(k) for k in keys}], keys, {"frac_correct": ".1%", "frac_mixed": ".1%"})
                + "\n`frac_mixed`: questions with both a correct and a wrong sample — the ones alignment can use.",
            )
        )

    figs = []
    for png, alt in (
        ("assess/score_histograms.png", "score distributions of positive vs negative candidates per model"),
        ("assess/acc_vs_k.png", "accuracy vs k for the selection rules"),
        ("assess/metrics.png", "headline metrics per model"),
    ):
        if (out / png).exists():
            figs.append(markdown_image(out / png, alt, out))
    vft_hist = (_load(out / "vft" / "metrics.json") or {}).get("log_history") or []
    if vft_hist:
        curve = [
            {"step": h["step"], "train_nll": h.get("nll"), "eval_loss": h.get("eval_loss")}
            for h in vft_hist
            if "step" in h
        ]
        plot_training_curves(out / "vft_curves.png", curve, ["train_nll", "eval_loss"], title="VFT: loss vs step")
        figs.append(markdown_image(out / "vft_curves.png", "VFT training and validation loss", out))
    diag_rows = []
    for name in models:
        m = _load(out / name / "metrics.json") or {}
        for h in m.get("diagnostics", []):
            diag_rows.append({"model": name, **h})
    if diag_rows:
        by_model: dict[str, list[dict]] = {}
        for r in diag_rows:
            by_model.setdefault(r["model"], []).append(r)
        for name, hist in by_model.items():
            p = out / name / "diagnostics.png"
            plot_training_curves(
                p,
                hist,
                ["mean_score_positive", "mean_score_negative", "mean_score_reference"],
                title=f"{name}: held-out candidate scores during alignment",
            )
            figs.append(markdown_image(p, f"{name} diagnostics", out))
    if figs:
        sections.append(("Plots", "\n\n".join(figs)))

    alarm_lines = []
    for name in models:
        for a in (_load(out / name / "metrics.json") or {}).get("alarms", []) or []:
            alarm_lines.append(f"- **{name}**: {a.get('message', a)}")
    sections.append(("Likelihood-displacement alarms", "\n".join(alarm_lines) or "None fired."))

    files = [f"- {_link(p, out)}" for p in sorted(out.glob("*/config.yaml")) + sorted(out.glob("*.config.yaml"))]
    files += [f"- {_link(p, out)}" for p in sorted(out.glob("*/metrics.json")) + sorted((out / "eval").glob("*.json"))]
    if (out / "assess" / "assessment.md").exists():
        files.append(f"- {_link(out / 'assess' / 'assessment.md', out)} (all assessment metrics)")
    sections.append(("Steps, configs and outputs", "\n".join(files)))
    if timings:
        total = sum(timings.values())
        sections.append(
            (
                "Wall time",
                markdown_table(
                    [{"step": k, "seconds": v} for k, v in timings.items()]
                    + [{"step": "total", "seconds": round(total, 1)}],
                    ["step", "seconds"],
                ),
            )
        )
    if plan is not None:
        sections.append(
            ("Plan", "```\n" + json.dumps(getattr(plan, "__dict__", plan), indent=1, default=str) + "\n```")
        )
    return write_report(out / "report.md", f"aftune run: {out.name}", sections)
