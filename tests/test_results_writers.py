"""The study results writers byte for byte: results.md / results.json of a grid study and results.json /
results-online.md of an arms study, written from a hand-built study folder (no training, so the inputs are
fixed) and compared with the files in tests/data/results_writers/, written by the writers as they stood before
they were split into steps. A changed table or number fails here; when a change is meant, rewrite the files with
AFTUNE_WRITE_GOLDEN=1 and read the diff."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import yaml
from conftest import TINY_PLAN

from aftune.commands.experiment.arms import load_arms_study
from aftune.commands.experiment.arms_results import write_arms_results
from aftune.commands.experiment.config import load_experiment
from aftune.commands.experiment.grid import grid
from aftune.commands.experiment.layout import runs_dir, trial_dir
from aftune.commands.experiment.results import write_results
from aftune.commands.experiment.tuning import default_lr, eval_name, selection
from aftune.io import atomic_write_json, write_jsonl
from aftune.records import Candidate, CandidatesMeta, Group, meta_path_for

GOLDEN = Path(__file__).parent / "data" / "results_writers"
N_Q = 16
GRID = dict(
    name="golden-grid",
    base="quick",
    plan=TINY_PLAN,
    seeds=[0, 1],
    methods=["bc", "rft"],
    k=[2, 4],
    beta=[0.5, 1.0],
    beta_auto={"mode": "gap", "factors": [2.0], "floor": 0.02},
    protocols=["continue", "from_base"],
)
TUNED = dict(
    name="golden-tuned",
    base="quick",
    plan=TINY_PLAN,
    seeds=[0, 1],
    methods=["bc"],
    k=[4],
    tune={"lr": [1.0e-5, 3.0e-5], "seeds": [5], "n_questions": 8},
)
ARMS = dict(
    name="golden-arms",
    base="quick",
    plan=TINY_PLAN,
    sample_k=4,
    seeds=[0, 1],
    arms={
        "control": {"command": "align", "method": "vft"},
        "bc_one_pass": {"command": "align", "method": "bc", "beta": 0.5},
        "bc_2_rounds": {"command": "iterate", "method": "bc", "rounds": 2, "candidates": "shared"},
        "grpo_dr": {"command": "grpo", "loss_type": "dr_grpo", "beta": 0.0},
    },
)


def _eval(path: Path, rng: random.Random, p: float, assessment: bool = True) -> None:
    """An eval.json and its per-question predictions: each question correct with probability p."""
    correct = [rng.random() < p for _ in range(N_Q)]
    ev = {"accuracy": sum(correct) / N_Q}
    if assessment:
        ev["assessment"] = {
            "assessment_acc_macro": round(rng.uniform(0.5, 0.8), 4),
            "best_of_k_self": round(rng.uniform(0.3, 0.6), 4),
            "ppl_positive": round(rng.uniform(1.1, 1.5), 4),
            "ppl_negative": round(rng.uniform(1.5, 2.5), 4),
        }
    atomic_write_json(path, ev)
    write_jsonl(path.with_suffix(".predictions.jsonl"), [{"id": f"q{i}", "correct": c} for i, c in enumerate(correct)])


def _candidates(path: Path, rng: random.Random) -> None:
    """A sampled candidates file with scores (auto beta reads them) and its sidecar's stats (the arms read them)."""
    groups = [
        Group(
            id=f"t{i}",
            task="arith",
            prompt=f"Question {i}?\nAnswer:\n",
            reference="#### 1",
            answer="1",
            candidates=[
                Candidate("#### 1", "1", ok, score=round(rng.uniform(-2.0, -0.1), 4))
                for ok in (rng.random() < 0.5 for _ in range(4))
            ],
        )
        for i in range(12)
    ]
    write_jsonl(path, [g.to_dict() for g in groups])
    stats = dict(questions=12, candidates=48, frac_correct=0.4375, frac_mixed=0.75, generated_tokens=5210, wall_s=7.25)
    CandidatesMeta(task="arith", status="complete", stats=stats).write(meta_path_for(path))


def _seed_files(root: Path, seed: int, kmax: int, rng: random.Random) -> None:
    sd = root / f"seed{seed}"
    _eval(sd / "eval" / "VFT.json", rng, 0.4)
    _candidates(sd / f"candidates.k{kmax}.jsonl", rng)


def _write_config(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _grid_study(tmp: Path, config: dict) -> tuple[Path, dict]:
    """A grid study's folder (every eval the results read) and what write_results returned."""
    exp = load_experiment(_write_config(tmp / "grid.yaml", config))
    root, report = tmp / "out", tmp / "report"
    rng = random.Random(0)
    runs = grid(exp)
    tuning = None
    if exp.tune is not None:
        # the trials: per setting and lr, the tuning seed's validation eval and its training seconds
        kind = runs_dir(exp.protocols[0])
        for r in runs:
            if r.seed != exp.seeds[0]:
                continue
            for lr in exp.tune.lrs:
                for s in exp.tune.seeds:
                    d = trial_dir(root, s, kind, r.setting, lr)
                    _eval(d / eval_name(exp.tune), rng, 0.5, assessment=False)
                    atomic_write_json(d / "metrics.json", {"compute": {"train_seconds": 61.5 + 10 * lr * 1e5}})
        chosen = {r.setting: selection(root, exp.tune, kind, r.setting) for r in runs if r.seed == exp.seeds[0]}
        lrs = {n: sel["chosen_lr"] for n, sel in chosen.items()}
        runs = [
            replace(r, lr=None if lrs[r.setting] == default_lr(exp.plan, "continue") else lrs[r.setting]) for r in runs
        ]
        tuning = [chosen[r.setting] for r in runs if r.seed == exp.seeds[0]]
    for s in exp.seeds:
        _seed_files(root, s, exp.kmax, rng)
        for protocol in exp.protocols:
            for r in runs:
                if r.seed == s:
                    _eval(root / f"seed{s}" / runs_dir(protocol) / r.cell / "eval.json", rng, 0.5)
    return report, write_results(root, report, exp, runs, tuning)


def _arms_study(tmp: Path) -> tuple[Path, dict]:
    """An arms study's folder (each arm's metrics.json and eval, the shared pass's sidecar) and its results."""
    study = load_arms_study(_write_config(tmp / "arms.yaml", ARMS))
    root, report = tmp / "out", tmp / "report"
    rng = random.Random(1)
    for s in study.seeds:
        _seed_files(root, s, study.kmax, rng)
        for arm in study.arms:
            d = root / f"seed{s}" / "online" / arm.name
            compute = {
                "generated_tokens": 1000 * (s + 1),
                "tokens_scored": 4000 + 7 * s,
                "optimizer_steps": 4,
                "train_seconds": 12.5 + s,
            }
            if arm.command == "iterate":
                rounds = [{"round": 0, "accuracy": 0.25, "model": "vft"}]
                for i in (1, 2):
                    c = {k: v * i for k, v in compute.items() if k != "train_seconds"}
                    c.update(sample={"wall_s": 3.5 * i}, train={"train_seconds": 11.0 + i})
                    rounds.append({"round": i, "accuracy": round(rng.random(), 4), "compute": c, "model": f"r{i}"})
                metrics = {"method": arm.fields["method"], "rounds": rounds}
            else:
                metrics = {"method": arm.fields.get("method", "grpo"), "compute": compute, "model": "m"}
            atomic_write_json(d / "run" / "metrics.json", metrics)
            _eval(d / "eval.json", rng, 0.5, assessment=False)
    return report, write_arms_results(root, report, study)


def _check(report: Path, names: tuple[str, ...], kind: str) -> None:
    for name in names:
        golden = GOLDEN / kind / name
        got = (report / name).read_bytes()
        if os.environ.get("AFTUNE_WRITE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_bytes(got)
        assert got == golden.read_bytes(), f"{kind}/{name} differs from {golden}"


def test_grid_results_byte_for_byte(tmp_path):
    report, results = _grid_study(tmp_path, GRID)
    _check(report, ("results.md", "results.json"), "grid")
    cells = {c["cell"] for c in results["cells"]}  # both protocols, the RFT comparison and the auto-beta cells
    assert {"bc-k2-gap2-l1 [from_base]", "rft-k4", "vft"} <= cells and results["auto_beta"]
    assert any(c.get("vs_rft") for c in results["cells"])
    assert sorted(p.name for p in (report / "plots").iterdir()) == [
        "accuracy.png",
        "accuracy_vs_beta.png",
        "accuracy_vs_k.png",
        "delta_vs_control.png",
    ]


def test_tuned_grid_results_byte_for_byte(tmp_path):
    report, results = _grid_study(tmp_path, TUNED)
    _check(report, ("results.md", "results.json"), "tuned")
    assert results["tuning"] and "Tuning (validation, seeds [5])" in (report / "results.md").read_text()


def test_arms_results_byte_for_byte(tmp_path):
    report, results = _arms_study(tmp_path)
    _check(report, ("results.json", "results-online.md"), "arms")
    assert [a["arm"] for a in results["arms"]] == ["control", "bc_one_pass", "bc_2_rounds", "grpo_dr"]
    assert sorted(p.name for p in (report / "plots").iterdir()) == [
        "accuracy.png",
        "accuracy_vs_generated_tokens.png",
        "accuracy_vs_wall_time.png",
        "delta_vs_control.png",
    ]
