"""`tune:` of a grid study: every cell trains at each trial lr on a tuning seed and is scored on validation; the
test seeds run each cell at its chosen lr, and refuse to start before the tuning has finished."""

import json

import pytest
import torch
import yaml
from conftest import TINY_PLAN, cli

from aftune.commands.experiment import load_experiment, run_experiment
from aftune.commands.experiment.tuning import choose_lr
from aftune.io import InputError

LRS = [1.0e-4, 3.0e-3]
CONFIG = dict(
    name="tuned",
    base="quick",
    plan={**TINY_PLAN, "vft_steps": 6},
    seeds=[0],
    methods=["rft"],
    k=[4],
    tune={"lr": LRS, "seeds": [5], "split": "validation", "n_questions": 10},
)


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_choose_lr_takes_the_best_mean_and_ties_to_the_smaller_lr():
    assert choose_lr({1e-4: [0.2, 0.4], 3e-4: [0.35, 0.35], 1e-5: [0.1, 0.1]}) == 3e-4
    assert choose_lr({3e-4: [0.3], 1e-4: [0.3], 1e-3: [0.1]}) == 1e-4
    with pytest.raises(ValueError):
        choose_lr({})


@pytest.mark.parametrize(
    "tune, key, message",
    [
        ({"lr": LRS, "seeds": [0]}, "tune.seeds", "also test seeds"),
        ({"lr": LRS, "seeds": [5], "split": "test"}, "tune.split", "never test"),
        ({"lr": [1e-4, 1e-4], "seeds": [5]}, "tune.lr", "distinct"),
        ({"lr": LRS, "seeds": [5], "n_questions": 0}, "tune.n_questions", ">= 1"),
        ({"lr": LRS, "seeds": [5], "beta": [0.1]}, "tune.beta", "unknown key"),
    ],
)
def test_bad_tune_blocks_are_refused(tmp_path, tune, key, message):
    with pytest.raises(InputError, match=message) as e:
        load_experiment(_write(tmp_path / "c.yaml", {**CONFIG, "tune": tune}))
    assert e.value.field == key
    with pytest.raises(InputError, match="one protocol"):
        load_experiment(_write(tmp_path / "p.yaml", {**CONFIG, "protocols": ["continue", "from_base"]}))


def test_tuned_study_chooses_on_validation_then_runs_the_test_seeds(tmp_path):
    cfg, out = _write(tmp_path / "t.yaml", CONFIG), tmp_path / "out"
    # the test seed alone before any trial: refused before any work, naming what to run first
    r = cli("experiment", cfg, "--out", out, "--seeds", "0", "--quiet")
    assert r.code != 0 and "--seeds 5" in r.stderr and not (out / "seed0").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = cli("experiment", cfg, "--out", out, "--seeds", "5", "--quiet")  # the tuning seed's process
        assert r.code == 0, r.stderr
        res = run_experiment(cfg, out=str(out), quiet=True)  # the test seed, then the results
    finally:
        torch.set_num_threads(threads)
    assert not (out / "seed5" / "runs").exists()  # the tuning seed runs trials only
    scores = {}
    for cell in ("vft", "rft-k4"):
        for lr in LRS:
            d = out / "seed5" / "tune" / "runs" / f"{cell}-lr{lr:g}"
            assert yaml.safe_load((d / "config.yaml").read_text())["lr"] == lr
            ev = json.loads((d / "eval.validation.json").read_text())
            preds = (d / "eval.validation.predictions.jsonl").read_text().splitlines()
            assert len(preds) == 10 and all("-validation-" in json.loads(p)["id"] for p in preds)
            scores[cell, lr] = ev["accuracy"]
    results = json.loads((out / "results.json").read_text())
    tuning = {t["name"]: t for t in results["tuning"]}
    cells = {c["cell"]: c for c in results["cells"]}
    for cell in ("vft", "rft-k4"):
        best = choose_lr({lr: [scores[cell, lr]] for lr in LRS})
        assert tuning[cell]["chosen_lr"] == best and [t["scores"] for t in tuning[cell]["trials"]] == [
            [scores[cell, lr]] for lr in LRS
        ]
        # the test seed's run at the chosen lr: the plan's own lr keeps the untuned folder name
        name = cell if best == 2e-4 else f"{cell}-lr{best:g}"  # quick plan: align_lr 2e-4 (not a trial lr here)
        d = out / "seed0" / "runs" / name
        assert yaml.safe_load((d / "config.yaml").read_text())["lr"] == best and (d / "eval.json").exists()
        assert cells[name]["lr"] == best and cells[name]["seeds"] == [0]
    assert res["results"] and "Tuning (validation, seeds [5])" in (out / "results.md").read_text()
