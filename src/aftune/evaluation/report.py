"""Markdown reports of the assessment diagnostics (render on GitHub: relative links and images)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aftune.evaluation.plots import plot_acc_vs_k, plot_metric_bars, plot_score_histograms
from aftune.io import atomic_write_json, atomic_write_text

MISSING = "–"  # en dash: an empty cell reads as a bug, a dash as "not defined"
DEFAULT_FLOAT_FORMAT = ".3f"

ACCURACY_COLUMNS = [
    "assessment_acc_macro",
    "assessment_acc_micro",
    "frac_negative_outranks_all_positives",
    "best_of_k_self",
    "weighted_vote",
    "majority_vote",
    "pass_at_k",
    "mean_candidate_acc",
]
LIKELIHOOD_COLUMNS = [
    "mean_score_positive",
    "mean_score_negative",
    "mean_score_reference",
    "ppl_positive",
    "ppl_negative",
    "ppl_reference",
    "score_correct_corr",
]
COUNT_COLUMNS = [
    "n_questions",
    "n_questions_mixed",
    "n_questions_only_positive",
    "n_questions_only_negative",
    "n_pairs",
    "n_candidates",
]
BAR_METRICS = ["assessment_acc_macro", "best_of_k_self", "weighted_vote", "majority_vote", "pass_at_k"]


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):  # before int: bool is an int subclass
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = "nan" if math.isnan(value) else format(value, fmt or DEFAULT_FLOAT_FORMAT)
    elif isinstance(value, int):
        text = format(value, fmt) if fmt else str(value)
    else:
        text = str(value)
    # a pipe would split the cell and a newline would end the table
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], formats: dict[str, str] | None = None
) -> str:
    """A GitHub Markdown table of `columns` from each row dict.

    `formats` maps a column to a format spec (e.g. ".1%", ".4f") applied with format(); floats
    without one use ".3f". Missing keys and None show as "–".
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    formats = formats or {}
    head = "| " + " | ".join(_cell(c, None) for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(c), formats.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def markdown_image(target: str | os.PathLike, alt: str, relative_to: str | os.PathLike) -> str:
    """![alt](relative/posix/path): GitHub resolves image paths relative to the Markdown file."""
    rel = os.path.relpath(Path(target).resolve(), Path(relative_to).resolve())
    return f"![{alt}]({Path(rel).as_posix().replace(' ', '%20')})"


def write_report(path: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write `# title` then one `## heading` per (heading, Markdown body) section, atomically."""
    parts = [f"# {title}\n"]
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.strip()}\n")
    path = Path(path)
    atomic_write_text(path, "\n".join(parts))
    return path


def assessment_report(
    out_dir: str | os.PathLike,
    named_metrics: dict[str, dict[str, Any]],
    named_scores: dict[str, tuple[Sequence[float], Sequence[float]]],
    alarms: list[dict[str, Any]] | None = None,
) -> Path:
    """Write assessment.json, the PNG plots and assessment.md into out_dir; return the .md path.

    named_metrics: model name -> `assessment_metrics(...)`; named_scores: model name -> (positive
    scores, negative scores) on the same candidates; alarms: `displacement_alarm` results.
    The Markdown is written last, so its presence means every file it links exists.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alarms = [a for a in (alarms or []) if a]
    atomic_write_json(out / "assessment.json", {"models": named_metrics, "alarms": alarms})

    rows = [{"model": name, **m} for name, m in named_metrics.items()]
    pct = {c: ".1%" for c in ACCURACY_COLUMNS}
    sections: list[tuple[str, str]] = []
    sections.append(
        (
            "Selection and assessment accuracy",
            markdown_table(rows, ["model", *ACCURACY_COLUMNS], pct)
            + "\nAssessment accuracy: fraction of (correct, wrong) candidate pairs of a question "
            "that the model scores correct-above-wrong (ties count 1/2), averaged over questions "
            "with both kinds (macro) or pooled over all pairs (micro). Selection metrics average "
            "over every question with at least one sampled candidate; the reference solution "
            "takes no part in them.",
        )
    )
    sections.append(
        (
            "Likelihood",
            markdown_table(rows, ["model", *LIKELIHOOD_COLUMNS])
            + "\nScores are length-normalised log-likelihoods in nats per token; perplexity is "
            "exp(-score), averaged over candidates. A falling positive or reference score "
            "during alignment is likelihood displacement.",
        )
    )
    sections.append(("Counts", markdown_table(rows, ["model", *COUNT_COLUMNS])))

    figures: list[str] = []
    if named_scores:
        plot_score_histograms(out / "score_histograms.png", named_scores)
        figures.append(
            markdown_image(out / "score_histograms.png", "score histograms of positive and negative candidates", out)
        )
    curves = {name: m["acc_vs_k"] for name, m in named_metrics.items() if (m.get("acc_vs_k") or {}).get("k")}
    if curves:
        plot_acc_vs_k(out / "acc_vs_k.png", curves)
        figures.append(markdown_image(out / "acc_vs_k.png", "accuracy vs k per selection rule", out))
    if named_metrics:
        plot_metric_bars(
            out / "metrics.png", {n: {k: m.get(k) for k in BAR_METRICS} for n, m in named_metrics.items()}, BAR_METRICS
        )
        figures.append(markdown_image(out / "metrics.png", "model comparison on the headline metrics", out))
    if figures:
        sections.append(("Figures", "\n\n".join(figures)))

    if alarms:
        body = "\n".join(f"- **{a.get('key', '?')}**: {a.get('message', a)}" for a in alarms)
    else:
        body = "None: no monitored score fell below its first value by more than its threshold."
    sections.append(("Likelihood-displacement alarms", body))
    sections.append(("Files", "- [assessment.json](assessment.json): every metric, per model"))
    return write_report(out / "assessment.md", "Assessment", sections)
