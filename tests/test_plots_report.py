"""Plots are real PNGs; reports hold the tables and working image links and are written atomically."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from aftune.evaluation.assessment import assessment_metrics, displacement_alarm
from aftune.evaluation.plots import (
    plot_acc_vs_k,
    plot_metric_bars,
    plot_score_histograms,
    plot_training_curves,
    shared_bin_edges,
)
from aftune.evaluation.report import assessment_report, markdown_image, markdown_table, write_report
from aftune.records import Candidate, Group

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_info(path: Path) -> tuple[int, int, float | None]:
    """(width, height, dpi) read from the IHDR and pHYs chunks."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    dpi = None
    i = data.find(b"pHYs")
    if i >= 0:
        ppm_x, _, unit = struct.unpack(">IIB", data[i + 4 : i + 13])
        if unit == 1:  # pixels per metre
            dpi = ppm_x * 0.0254
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"), "truncated PNG"
    return width, height, dpi


def assert_sensible_png(path: Path, min_w: int = 500, min_h: int = 300) -> None:
    w, h, dpi = png_info(path)
    assert min_w <= w <= 4000 and min_h <= h <= 4000, (w, h)
    assert dpi is not None and round(dpi) == 120
    assert path.stat().st_size > 10_000  # an empty white canvas compresses far below this
    assert not list(path.parent.glob(".*.tmp*")), "temporary file left behind"


def toy_groups(shift: float = 0.0) -> list[Group]:
    def g(gid: str, cands: list[tuple[str | None, bool, float]]) -> Group:
        return Group(
            id=gid,
            task="toy",
            prompt="Q?",
            reference="r",
            answer="1",
            candidates=[
                Candidate(text="t", answer=a, correct=c, score=s + (shift if c else 0.0)) for a, c, s in cands
            ],
        )

    return [
        g("a", [("1", True, -0.4), ("2", False, -0.3), ("1", True, -0.5), ("3", False, -0.9)]),
        g("b", [("1", True, -0.2), ("2", False, -0.6)]),
        g("c", [("2", False, -0.7), ("2", False, -0.8), ("1", True, -0.75), ("4", False, -0.3)]),
    ]


def pos_neg(groups: list[Group]) -> tuple[list[float], list[float]]:
    cs = [c for g in groups for c in g.candidates]
    return [c.score for c in cs if c.correct], [c.score for c in cs if not c.correct]


def test_package_import_does_not_load_matplotlib():
    code = "import sys, aftune.evaluation; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_shared_bin_edges_span_all_models():
    edges = shared_bin_edges({"VFT": ([-0.5], [-1.0]), "AFT": ([-0.1], [-2.0])}, bins=4)
    assert edges == pytest.approx([-2.0, -1.525, -1.05, -0.575, -0.1])
    assert shared_bin_edges({"m": ([-0.3], [])}, bins=2) == pytest.approx([-0.8, -0.3, 0.2])


def test_score_histograms_png(tmp_path):
    named = {"VFT": pos_neg(toy_groups()), "AFT": pos_neg(toy_groups(shift=0.3)), "empty": ([], [])}
    out = plot_score_histograms(tmp_path / "hist.png", named)
    assert out == tmp_path / "hist.png"
    assert_sensible_png(out, min_h=600)  # three stacked panels


def test_acc_vs_k_png(tmp_path):
    curves = {
        "VFT": assessment_metrics(toy_groups())["acc_vs_k"],
        "AFT": assessment_metrics(toy_groups(shift=0.3))["acc_vs_k"],
    }
    assert_sensible_png(plot_acc_vs_k(tmp_path / "one.png", {"VFT": curves["VFT"]}))
    assert_sensible_png(plot_acc_vs_k(tmp_path / "sub" / "two.png", curves))  # creates the folder
    # curves with None (no questions) must not crash
    assert_sensible_png(
        plot_acc_vs_k(tmp_path / "none.png", {"x": {"k": [1, 2], "pass_at_k": [None, None]}}), min_w=300, min_h=200
    )


def test_metric_bars_png(tmp_path):
    table = {
        "VFT": {"assessment_acc_macro": 0.62, "best_of_k_self": 0.3, "ppl_positive": 1.9},
        "AFT": {"assessment_acc_macro": 0.71, "best_of_k_self": 0.36, "ppl_positive": None},
    }
    out = plot_metric_bars(tmp_path / "bars.png", table, ["assessment_acc_macro", "best_of_k_self", "ppl_positive"])
    assert_sensible_png(out)


def test_training_curves_png(tmp_path):
    hist = [
        {
            "step": s,
            "mean_score_positive": -0.5 - 0.01 * s,
            "mean_score_reference": -0.3 - 0.005 * s,
            "loss": 2.0 / (1 + s),
        }
        for s in range(0, 100, 10)
    ]
    hist.insert(3, {"step": 25, "loss": 0.1})  # entries missing a key are skipped
    out = plot_training_curves(tmp_path / "train.png", hist, ["mean_score_positive", "mean_score_reference", "loss"])
    assert_sensible_png(out, min_h=500)


def test_markdown_table_formats_and_missing_values():
    rows = [
        {"model": "VFT", "acc": 0.5, "n": 3, "ok": True},
        {"model": "A|B", "acc": None, "n": 10},
        {"model": "AFT", "acc": 0.123456, "n": 7, "ok": False},
    ]
    text = markdown_table(rows, ["model", "acc", "n", "ok"])
    assert text == (
        "| model | acc | n | ok |\n"
        "|---|---|---|---|\n"
        "| VFT | 0.500 | 3 | yes |\n"
        "| A\\|B | – | 10 | – |\n"
        "| AFT | 0.123 | 7 | no |\n"
    )
    assert "| 12.3% |" in markdown_table(rows[2:], ["acc"], {"acc": ".1%"})
    assert markdown_table([{"x": float("nan")}], ["x"]).splitlines()[-1] == "| nan |"
    with pytest.raises(ValueError):
        markdown_table(rows, [])


def test_markdown_image_is_relative_posix(tmp_path):
    (tmp_path / "figs").mkdir()
    assert markdown_image(tmp_path / "figs" / "a b.png", "alt", tmp_path) == "![alt](figs/a%20b.png)"


def test_write_report_layout(tmp_path):
    path = write_report(tmp_path / "r.md", "Title", [("One", "body one\n"), ("Two", "| a |\n|---|\n| 1 |")])
    assert path.read_text() == "# Title\n\n## One\n\nbody one\n\n## Two\n\n| a |\n|---|\n| 1 |\n"


def test_write_report_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.md"
    write_report(path, "Old", [("s", "old body")])
    before = path.read_text()

    def crash(src, dst):  # the rename is the commit point; a crash there must leave the old report
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        write_report(path, "New", [("s", "new body " * 1000)])
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]  # no temporary file left behind


def test_assessment_report_end_to_end(tmp_path):
    vft, aft = toy_groups(), toy_groups(shift=0.3)
    named_metrics = {"VFT": assessment_metrics(vft), "AFT": assessment_metrics(aft)}
    hist = [{"step": 0, "mean_score_positive": -0.4}, {"step": 50, "mean_score_positive": -0.9}]
    alarm = displacement_alarm(hist, "mean_score_positive", 0.1)
    md_path = assessment_report(
        tmp_path / "out", named_metrics, {"VFT": pos_neg(vft), "AFT": pos_neg(aft)}, alarms=[alarm]
    )
    out = tmp_path / "out"
    assert md_path == out / "assessment.md"
    md = md_path.read_text()

    data = json.loads((out / "assessment.json").read_text())
    assert data["models"]["AFT"]["assessment_acc_macro"] == pytest.approx(named_metrics["AFT"]["assessment_acc_macro"])
    assert data["alarms"][0]["key"] == "mean_score_positive"

    assert md.startswith("# Assessment\n")
    assert "| model | assessment_acc_macro |" in md
    for name in ("VFT", "AFT"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} | "))
        expected = format(named_metrics[name]["assessment_acc_macro"], ".1%")
        assert row.split(" | ")[1] == expected
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(images) == ["acc_vs_k.png", "metrics.png", "score_histograms.png"]
    for rel in images:
        assert not os.path.isabs(rel)
        assert_sensible_png(out / rel)
    assert "[assessment.json](assessment.json)" in md
    assert "likelihood displacement" in md and "mean_score_positive" in md


def test_assessment_report_without_alarms_or_scores(tmp_path):
    md = assessment_report(tmp_path, {"VFT": assessment_metrics([])}, {}).read_text()
    assert "None: no monitored score fell" in md
    assert "score_histograms.png" not in md
    assert "| VFT | – |" in md  # empty metrics show as dashes


def test_many_models_switch_to_readable_layouts(tmp_path):
    from aftune.evaluation.plots import MANY_MODELS, plot_acc_vs_k, plot_metric_bars

    n = MANY_MODELS + 3
    table = {f"m{i}": {"assessment_acc_macro": 0.5 + i / 100, "pass_at_k": None} for i in range(n)}
    p = plot_metric_bars(tmp_path / "bars.png", table, ["assessment_acc_macro", "pass_at_k"])
    curves = {
        f"m{i}": {"k": [1, 2, 4], "best_of_k_self": [0.4, 0.5, 0.5 + i / 100], "pass_at_k": [0.4, 0.6, 0.7]}
        for i in range(n)
    }
    q = plot_acc_vs_k(tmp_path / "acck.png", curves)
    for path in (p, q):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    # the horizontal layout is taller than wide per model: one row per model
    from PIL import Image

    w, h = Image.open(p).size
    assert h > 0.28 * n * 120
