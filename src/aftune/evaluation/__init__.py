"""Evaluation: assessment diagnostics over scored candidates, their plots and Markdown reports.

Plotting functions import matplotlib lazily, so importing this package stays cheap and headless.
"""

from aftune.evaluation.assessment import acc_vs_k, assessment_metrics, displacement_alarm, per_question
from aftune.evaluation.plots import plot_acc_vs_k, plot_metric_bars, plot_score_histograms, plot_training_curves
from aftune.evaluation.report import assessment_report, markdown_image, markdown_table, write_report

__all__ = [
    "acc_vs_k",
    "assessment_metrics",
    "displacement_alarm",
    "per_question",
    "plot_acc_vs_k",
    "plot_metric_bars",
    "plot_score_histograms",
    "plot_training_curves",
    "assessment_report",
    "markdown_image",
    "markdown_table",
    "write_report",
]
