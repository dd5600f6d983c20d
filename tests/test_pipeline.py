"""A tiny end-to-end run of the demo pipeline (VFT -> sample -> control/AFT/RFT -> eval -> assess -> report)."""

import json
from dataclasses import replace

import pytest
from conftest import TINY_PLAN

from aftune.commands.demo import QUICK, run_demo
from aftune.config import DemoConfig

TINY = replace(QUICK, **TINY_PLAN, diag_every=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = run_demo(DemoConfig(out=str(out), quiet=True), plan=TINY)
    return out, res


def test_demo_writes_every_step_and_a_report(demo):
    out, res = demo
    for name in ("VFT", "control", "AFT-BC", "RFT"):
        ev = json.loads((out / "eval" / f"{name}.json").read_text())
        assert ev["n"] == 16 and 0.0 <= ev["accuracy"] <= 1.0
        assert (out / "eval" / f"{name}.predictions.jsonl").exists()
    assess = json.loads((out / "assess" / "assessment.json").read_text())["models"]
    assert set(assess) == {"VFT", "control", "AFT-BC", "RFT"}
    report = (out / "report.md").read_text()
    for needle in ("| VFT |", "| control |", "| AFT-BC |", "score_histograms.png", "Wall time", "config.yaml"):
        assert needle in report
    for png in ("assess/score_histograms.png", "assess/acc_vs_k.png", "vft_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # configs saved next to outputs, with flag names as keys
    assert "method: bc" in (out / "AFT-BC" / "config.yaml").read_text()


def test_demo_resumes_without_redoing_steps(demo):
    out, res = demo
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/model/model.safetensors")}
    res2 = run_demo(DemoConfig(out=str(out), quiet=True), plan=TINY)
    after = {p: p.stat().st_mtime_ns for p in out.glob("*/model/model.safetensors")}
    assert before == after and len(before) == 4
    assert res2["timings"] == res["timings"]


def test_alignment_diagnostics_reach_tensorboard(demo, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aftune.commands.align import run_align
    from aftune.commands.demo import task_args_for
    from aftune.config import AlignConfig

    out, _ = demo
    m = run_align(
        AlignConfig(
            model=str(out / "vft" / "model"),
            candidates=str(out / "candidates.jsonl"),
            diag_candidates=str(out / "assess_candidates.jsonl"),
            out=str(tmp_path / "a"),
            method="align",
            task_args=task_args_for(TINY, 0),
            max_steps=4,
            batch_size=4,
            diag_every=2,
            report_to="tensorboard",
            quiet=True,
            logging_steps=1,
            save_steps=100,
        )
    )
    assert [h["step"] for h in m["diagnostics"]] == [0, 2, 4]
    events = list((tmp_path / "a").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    from aftune.records import read_groups

    # the macro accuracy exists only over mixed questions (the tiny demo's draws may leave none)
    mixed = any(g.mixed for g in read_groups(out / "assess_candidates.jsonl"))
    assert any("diag/mean_score_negative" in t for t in tags), tags
    assert mixed == any("diag/assessment_acc_macro" in t for t in tags), tags
    assert any("align_loss" in t for t in tags), tags
