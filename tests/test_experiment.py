"""`aftune experiment`: a tiny grid end to end, resume, config errors, the paired test, per-question beta."""

import json
import math

import pytest
import torch
import yaml
from conftest import TINY_PLAN, cli

from aftune.commands.experiment import grid, load_experiment, run_experiment
from aftune.io import InputError
from aftune.sampling.store import subsample_candidates
from aftune.training.reference import gap_beta

CONFIG = dict(
    name="tiny",
    base="quick",
    plan=TINY_PLAN,
    seeds=[0, 1],
    methods=["bc"],
    k=[2, 4],
    beta=[0.5],
    **{"lambda": [1.0]},
    beta_auto={"mode": "gap", "factors": [2.0], "floor": 0.02},
)


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine is faster on one thread
    try:
        d = tmp_path_factory.mktemp("exp")
        cfg = _write(d / "tiny.yaml", CONFIG)
        res = run_experiment(cfg, out=str(d / "out"), quiet=True)
        yield d, cfg, res
    finally:
        torch.set_num_threads(threads)


def test_grid_runs_end_to_end(experiment):
    d, _, res = experiment
    out = d / "out"
    results = json.loads((out / "results.json").read_text())
    cells = {c["cell"]: c for c in results["cells"]}
    # control once per seed (k / beta / lambda do not change it), bc at each k x (beta 0.5, auto)
    assert set(cells) == {"VFT", "vft", "bc-k2-b0.5-l1", "bc-k4-b0.5-l1", "bc-k2-gap2-l1", "bc-k4-gap2-l1"}
    assert res["n_runs"] == 2 * 5
    for name, c in cells.items():
        assert c["seeds"] == [0, 1]
        acc = c["metrics"]["test_acc"]
        ev = [
            json.loads(
                (out / f"seed{s}" / ("eval/VFT.json" if name == "VFT" else f"runs/{name}/eval.json")).read_text()
            )
            for s in (0, 1)
        ]
        assert acc["values"] == [e["accuracy"] for e in ev]
        assert acc["mean"] == pytest.approx(sum(acc["values"]) / 2)
        assert acc["std"] == pytest.approx(abs(acc["values"][0] - acc["values"][1]) / math.sqrt(2))
        for col in ("assess_acc", "self_rerank", "ppl_pos", "ppl_neg"):
            assert set(c["metrics"][col]) == {"mean", "std", "n", "values"}
        if name != "vft":
            t = c["vs_control"]
            assert (t["n_questions"], t["n_seeds"]) == (16, 2) and 0 <= t["p_question"] <= 1
            assert t["diff"] == pytest.approx(acc["mean"] - cells["vft"]["metrics"]["test_acc"]["mean"])
            ctl = cells["vft"]["metrics"]["test_acc"]["values"]
            assert t["diff_per_seed"] == pytest.approx([a - b for a, b in zip(acc["values"], ctl)])
            assert t["ci95"][0] <= t["diff"] <= t["ci95"][1] and "se" not in t and "b" not in t
    for s in (0, 1):
        preds = (out / f"seed{s}" / "runs" / "bc-k2-b0.5-l1" / "eval.predictions.jsonl").read_text().splitlines()
        assert len(preds) == 16 and "correct" in json.loads(preds[0])
        # the k=2 file is the k=4 sample cut to its first 2 candidates per group, not a second sampling run
        big = [json.loads(line) for line in (out / f"seed{s}" / "candidates.k4.jsonl").read_text().splitlines()]
        small = [json.loads(line) for line in (out / f"seed{s}" / "candidates.k2-of4.jsonl").read_text().splitlines()]
        assert [g["id"] for g in big] == [g["id"] for g in small]
        assert all(
            [c["text"] for c in g2["candidates"]] == [c["text"] for c in g4["candidates"][:2]]
            for g2, g4 in zip(small, big)
        )
        cfg = yaml.safe_load((out / f"seed{s}" / "runs" / "bc-k2-gap2-l1" / "config.yaml").read_text())
        # the per-question beta is a loss option of bc (its floor 0.02), not a method of its own
        assert (cfg["method"], cfg["beta_auto"], cfg["beta_floor"]) == ("bc", "gap", 0.02)
        assert cfg["beta"] == 2.0 and cfg["max_candidates"] == 3
        assert not (out / f"seed{s}" / "runs" / "vft" / "checkpoints").exists()
        assert len(list((out / f"seed{s}").glob("reflogps-*.json"))) == 2  # VFT scores for the auto runs (k=2, k=4)
    md = (out / "results.md").read_text()
    assert "| bc-k4-gap2-l1 |" in md and "McNemar" in md and "question-level" in md and "Per-question beta" in md
    assert "vs RFT" not in md and not any("vs_rft" in c for c in results["cells"])  # no RFT cell: no columns
    for png in ("accuracy.png", "delta_vs_control.png", "accuracy_vs_k.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "plots" / "accuracy_vs_beta.png").exists()  # one numeric beta: no curve to draw


def test_rerun_skips_finished_runs(experiment):
    d, cfg, res = experiment
    out = d / "out"
    models = sorted(out.glob("seed*/**/model/model.safetensors"))
    assert len(models) == 2 * 6  # VFT + 5 runs per seed
    before = {p: p.stat().st_mtime_ns for p in models}
    res2 = run_experiment(cfg, out=str(out), quiet=True)
    assert {p: p.stat().st_mtime_ns for p in models} == before
    assert res2["timings"] == res["timings"] and len(res2["skipped"]) == len(res["timings"])
    assert json.loads((out / "results.json").read_text())["cells"] == res["cells"]


def test_changed_plan_under_the_same_out_is_refused(experiment, tmp_path):
    d, _, _ = experiment
    cfg = _write(tmp_path / "c.yaml", {**CONFIG, "plan": {**TINY_PLAN, "align_steps": 5}})
    with pytest.raises(InputError, match="different plan"):
        run_experiment(cfg, out=str(d / "out"), quiet=True)


@pytest.mark.parametrize(
    "data, key, message",
    [
        ({"metods": ["bc"]}, "metods", "unknown key"),
        ({"plan": {"vft_stps": 3}}, "plan.vft_stps", "unknown plan field"),
        ({"plan": {"vft_steps": "many"}}, "plan.vft_steps", "expected int"),
        ({"methods": ["bc", "nope"]}, "methods", "unknown method 'nope'"),
        ({"k": [1, 4]}, "k", ">= 2"),
        ({"beta": [0.0]}, "beta", "> 0"),
        ({"methods": ["dc"], "beta_auto": "gap"}, "beta_auto", "per-question beta"),
        ({"beta_auto": {"mode": "gap", "factor": 2}}, "beta_auto.factor", "unknown key"),
        ({"k": [2, 8], "sample_k": 4}, "sample_k", ">= every k"),
        ({"report": 3}, "report", "folder path"),
        ({"protocols": ["continue", "from_scratch"]}, "protocols", "distinct protocols from"),
        ({"protocols": ["continue", "continue"]}, "protocols", "distinct protocols from"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, data, key, message):
    path = _write(tmp_path / "bad.yaml", {"name": "x", "methods": ["bc"], **data})
    with pytest.raises(InputError, match=message) as e:
        load_experiment(path)
    assert str(path) in str(e.value) and f"field '{key}'" in str(e.value)


def test_seed_processes_then_one_results_run_with_a_shared_out(tmp_path):
    """--seeds runs part of the grid and writes no results; the run over all seeds skips that work and
    writes the results under `report`. A second study with the same plan in the same `out` reuses the VFT
    models, the k=sample_k candidates and the control."""

    base = dict(
        CONFIG,
        plan={**TINY_PLAN, "vft_steps": 6},
        methods=["bc"],
        k=[2],
        beta_auto=None,
        sample_k=4,
        out=str(tmp_path / "shared"),
    )
    a = _write(tmp_path / "a.yaml", {**base, "name": "a", "report": str(tmp_path / "rep_a")})
    b = _write(tmp_path / "b.yaml", {**base, "name": "b", "report": str(tmp_path / "rep_b"), "methods": ["dc"]})
    shared = tmp_path / "shared"

    r = cli("experiment", a, "--seeds", "1", "--quiet")
    assert r.code == 0, r.stderr
    assert (shared / "seed1" / "runs" / "bc-k2-b0.5-l1" / "eval.json").exists() and not (shared / "seed0").exists()
    assert (shared / "seed1" / "candidates.k4.jsonl").exists() and (
        shared / "seed1" / "candidates.k2-of4.jsonl"
    ).exists()
    assert not (tmp_path / "rep_a" / "results.md").exists() and "run without --seeds" in r.stdout
    seed1 = {p: p.stat().st_mtime_ns for p in (shared / "seed1").rglob("model.safetensors")}

    r = cli("experiment", a, "--quiet")
    assert r.code == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in (shared / "seed1").rglob("model.safetensors")} == seed1  # not redone
    assert "| bc-k2-b0.5-l1 |" in (tmp_path / "rep_a" / "results.md").read_text()
    assert not (shared / "results.md").exists()
    timings = json.loads((shared / "timings.json").read_text())
    assert "seed1/align bc-k2-b0.5-l1" in timings and "seed0/align bc-k2-b0.5-l1" in timings

    before = {p: p.stat().st_mtime_ns for p in shared.rglob("model.safetensors")}
    r = cli("experiment", b, "--quiet")
    assert r.code == 0, r.stderr
    after = {p: p.stat().st_mtime_ns for p in shared.rglob("model.safetensors")}
    assert all(after[p] == t for p, t in before.items())  # VFT models and the control reused
    assert len(after) == len(before) + 2  # only dc-k2-l1, once per seed
    md = (tmp_path / "rep_b" / "results.md").read_text()
    assert "| dc-k2-l1 |" in md and "bc-k2" not in md

    r = cli("experiment", a, "--seeds", "0,x")
    assert r.code == 2 and "--seeds" in r.stderr
    r = cli("experiment", a, "--seeds", "5")
    assert r.code == 2 and "not a subset" in r.stderr


def test_from_base_protocol_trains_from_the_base_for_the_vft_budget(tmp_path):
    """protocols: [continue, from_base] runs every cell twice; from_base starts from VFT's own start model
    (the tiny model's saved init) with VFT's steps, lr and NLL batch; each protocol has its own control, and the
    sanity checks compare RFT with the VFT start."""
    plan = {**TINY_PLAN, "vft_steps": 6, "vft_batch": 8, "align_batch": 4}
    cfg = _write(
        tmp_path / "p.yaml",
        {
            **CONFIG,
            "plan": plan,
            "seeds": [0],
            "methods": ["rft"],
            "k": [4],
            "beta_auto": None,
            "protocols": ["continue", "from_base"],
        },
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_experiment(cfg, out=str(tmp_path / "out"), quiet=True)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "out"
    fb = yaml.safe_load((out / "seed0" / "runs-from-base" / "rft-k4" / "config.yaml").read_text())
    assert fb["model"] == str(out / "seed0" / "vft" / "init")
    vft_lr = load_experiment(cfg).plan.vft_lr
    assert (fb["max_steps"], fb["lr"], fb["batch_size"], fb["nll_per_question"]) == (6, vft_lr, 4, 2)
    cont = yaml.safe_load((out / "seed0" / "runs" / "rft-k4" / "config.yaml").read_text())
    assert cont["model"] == str(out / "seed0" / "vft" / "model") and cont["max_steps"] == TINY_PLAN["align_steps"]
    assert cont["nll_per_question"] == 1
    results = json.loads((out / "results.json").read_text())
    cells = {c["cell"]: c for c in results["cells"]}
    assert set(cells) == {"VFT", "vft", "rft-k4", "vft [from_base]", "rft-k4 [from_base]"}
    assert res["n_runs"] == 2  # grid cells; each runs under both protocols
    c, ctl = cells["rft-k4 [from_base]"], cells["vft [from_base]"]
    t = c["vs_control"]
    assert t["diff"] == pytest.approx(c["metrics"]["test_acc"]["mean"] - ctl["metrics"]["test_acc"]["mean"])
    v = c["vs_vft"]
    assert v["diff"] == pytest.approx(c["metrics"]["test_acc"]["mean"] - cells["VFT"]["metrics"]["test_acc"]["mean"])
    # every non-RFT cell is also tested against its protocol's RFT cell (the baseline AFT must match)
    assert "vs_rft" not in c and "vs_rft" not in cells["rft-k4"]
    w = ctl["vs_rft"]
    assert w["diff"] == pytest.approx(ctl["metrics"]["test_acc"]["mean"] - c["metrics"]["test_acc"]["mean"])
    # the same discordant questions, seen from the other side
    assert [(x["b"], x["c"]) for x in w["per_seed"]] == [(x["c"], x["b"]) for x in t["per_seed"]]
    assert w["p_question"] == pytest.approx(t["p_question"])
    checks = results["sanity_checks"]
    assert set(checks["rft_over_vft"]["cells"]) == {"rft-k4", "rft-k4 [from_base]"}
    assert checks["vft_seed_spread"]["pass"] is None  # one seed: nothing to compare
    md = (out / "results.md").read_text()
    assert "Sanity checks of the testbed" in md and "| rft-k4 [from_base] |" in md and "Δ vs RFT, pts [95% CI]" in md


def test_sanity_checks_by_hand():
    from aftune.commands.experiment.config import Experiment
    from aftune.commands.experiment.results import sanity_checks

    def cell(name, method, accs, assess=None, vs_vft=None):
        return {
            "cell": name,
            "method": method,
            "metrics": {
                "test_acc": {"values": accs, "mean": sum(accs) / len(accs)},
                "assess_acc": {"mean": assess},
            },
            **({"vs_vft": vs_vft} if vs_vft else {}),
        }

    exp = Experiment(name="x", out="o", plan=None, seeds=(0, 1, 2), grids=())
    base = [cell("VFT", "VFT (start)", [0.40, 0.42, 0.43], assess=0.7)]
    good = {"diff": 0.025, "ci95": [0.01, 0.04], "p_question": 0.01}
    checks = sanity_checks(base + [cell("rft-k8", "rft", [0.43] * 3, vs_vft=good)], exp)
    assert checks["vft_seed_spread"]["spread_pts"] == pytest.approx(3.0)
    assert checks["vft_seed_spread"]["pass"] and checks["vft_assessment"]["pass"] and checks["rft_over_vft"]["pass"]
    # a gain below 2 points, or one that is not significant, fails; either protocol passing is enough
    small = {"diff": 0.015, "ci95": [0.005, 0.025], "p_question": 0.001}
    noisy = {"diff": 0.03, "ci95": [-0.01, 0.07], "p_question": 0.2}
    checks = sanity_checks(
        [cell("VFT", "VFT (start)", [0.30, 0.40], assess=0.95)]
        + [cell("rft-k8", "rft", [0.4] * 2, vs_vft=small), cell("rft-k8 [from_base]", "rft", [0.4] * 2, vs_vft=noisy)],
        exp,
    )
    assert not checks["vft_seed_spread"]["pass"] and not checks["vft_assessment"]["pass"]
    assert not checks["rft_over_vft"]["pass"]
    checks = sanity_checks(
        base
        + [cell("rft-k8", "rft", [0.4] * 3, vs_vft=small), cell("rft-k8 [from_base]", "rft", [0.4] * 3, vs_vft=good)],
        exp,
    )
    assert checks["rft_over_vft"]["pass"] and not checks["rft_over_vft"]["cells"]["rft-k8"]["pass"]


def test_grid_collapses_axes_a_method_ignores(tmp_path):
    exp = load_experiment(
        _write(
            tmp_path / "g.yaml",
            {"methods": ["rft", "dc", "bc"], "seeds": [3], "k": [2, 8], "beta": [0.1, 0.5], "lambda": [0.5, 1]},
        )
    )
    cells = [r.cell for r in grid(exp)]
    assert cells[0] == "vft"  # the control is added and comes first
    assert cells.count("vft") == 1 and "rft-k2" in cells and "rft-k8" in cells
    assert sum(c.startswith("dc-") for c in cells) == 2 * 2 and sum(c.startswith("bc-") for c in cells) == 2 * 2 * 2
    assert len(cells) == 1 + 2 + 4 + 8


def test_sub_grids_run_their_union_once(tmp_path):
    exp = load_experiment(
        _write(
            tmp_path / "g.yaml",
            {
                "methods": ["bc"],
                "k": [8],
                "beta": [0.5],
                "lambda": [1],
                "seeds": [0, 1],
                "grids": [
                    {"k": [2, 8]},
                    {"beta": [0.1, 0.5]},
                    {"lambda": [0.5, 1], "beta_auto": {"factors": [2], "floor": 0.01}},
                ],
            },
        )
    )
    cells = [r.cell for r in grid(exp) if r.seed == 0]
    assert cells == [
        "vft",
        "bc-k2-b0.5-l1",
        "bc-k8-b0.5-l1",
        "bc-k8-b0.1-l1",
        "bc-k8-b0.5-l0.5",
        "bc-k8-gap2-l0.5",
        "bc-k8-gap2-l1",
    ]
    assert exp.ks == (2, 8) and len(grid(exp)) == 2 * len(cells)
    with pytest.raises(InputError, match="field 'grids\\[0\\].kk'"):
        load_experiment(_write(tmp_path / "b.yaml", {"grids": [{"kk": [2]}]}))


def test_gap_beta_and_per_question_loss():
    from aftune import losses
    from aftune.training.arguments import auto_beta_eligible
    from aftune.training.data import AlignDataset, GroupItem
    from aftune.training.methods import METHODS, CandidateBatch
    from aftune.training.reference import question_betas

    # weakest positive -0.3; gaps to negatives 0.1, 0.2, 0.4 -> median 0.2, x2
    assert gap_beta([-0.1, -0.3], [-0.4, -0.5, -0.7], 2.0, 0.02) == pytest.approx(0.4)
    assert gap_beta([-0.5], [-0.1], 2.0, 0.02) == 0.02  # VFT prefers the negative: floor
    assert gap_beta([-0.5], [], 2.0, 0.02) == 0.02

    method = METHODS["bc"]
    assert auto_beta_eligible(method) and method.uses_beta and not auto_beta_eligible(METHODS["dpo-bc"])
    mean = torch.tensor([[-0.1, -0.3, -0.2], [-0.2, -0.25, -0.9]], requires_grad=True)
    lengths = [[10, 20, 5], [8, 4, 2]]
    positive = torch.tensor([[True, False, False], [True, True, False]])
    valid = torch.ones_like(positive)
    vft = [[-0.2, -0.5, -0.3], [-0.1, -0.3, -0.6]]  # per-token VFT scores
    # the per-question betas come from the start model's summed log-probs and the candidates' lengths
    ds = AlignDataset.__new__(AlignDataset)
    ds.items = [
        GroupItem(
            [1],
            [[0] * n for n in ls],
            pos.tolist(),
            [0 if p else 1 for p in pos.tolist()],
            [False] * 3,
            ref_logps=[v * n for v, n in zip(vs, ls)],
        )
        for ls, pos, vs in zip(lengths, positive, vft)
    ]
    question_betas(ds, 2.0, 0.02)
    betas = torch.tensor([it.beta for it in ds.items])
    # question 0: gaps 0.3, 0.1 -> median 0.2 -> beta 0.4; question 1: weakest -0.3, gap 0.3 -> beta 0.6
    assert betas.tolist() == pytest.approx([0.4, 0.6])
    batch = CandidateBatch(
        mean, mean * torch.tensor(lengths), positive, torch.where(positive, 0, 1), valid, beta=betas
    )
    got = method.loss(batch)
    want = torch.cat(
        [
            losses.boundary_constraint_loss(mean[:1], positive[:1], valid[:1], beta=0.4),
            losses.boundary_constraint_loss(mean[1:], positive[1:], valid[1:], beta=0.6),
        ]
    )
    assert torch.allclose(got, want)
    got.sum().backward()
    assert torch.isfinite(mean.grad).all()


def test_subsample_recomputes_ranks(tmp_path):
    from aftune.records import Candidate, Group, meta_path_for, read_groups

    g = Group(
        "1",
        "arith",
        "Q",
        "R",
        "5",
        [
            Candidate("a #### 4", "4", False, rank=1, wrong_steps=1),
            Candidate("b #### 5", "5", True, rank=0, wrong_steps=0),
            Candidate("c #### 6", "6", False, rank=2, wrong_steps=3),
        ],
    )
    src = tmp_path / "c.k3.jsonl"
    src.write_text(json.dumps(g.to_dict()) + "\n")
    meta_path_for(src).write_text(json.dumps({"task": "arith", "sampling": {"k": 3}}))
    subsample_candidates(src, tmp_path / "c.k2.jsonl", 2)
    (h,) = read_groups(tmp_path / "c.k2.jsonl")
    assert [c.text for c in h.candidates] == ["a #### 4", "b #### 5"] and [c.rank for c in h.candidates] == [1, 0]
    assert json.loads(meta_path_for(tmp_path / "c.k2.jsonl").read_text())["sampling"]["k"] == 2


def test_compare_runs_script_matches_the_table(experiment):
    """scripts/compare_runs.py pairs any two runs: bc vs the control reproduces the table's vs_control."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    d, _, _ = experiment
    out = d / "out"
    t = {c["cell"]: c for c in json.loads((out / "results.json").read_text())["cells"]}["bc-k2-b0.5-l1"]["vs_control"]
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"
    r = subprocess.run(
        [sys.executable, str(script), str(out), "runs/bc-k2-b0.5-l1", "runs/vft", "--seeds", "0,1"],
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r": ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\] pts over (\d+) questions x (\d+) seeds", r.stdout)
    assert m, r.stdout
    assert float(m[1]) == pytest.approx(100 * t["diff"], abs=0.05)
    assert [float(m[2]), float(m[3])] == pytest.approx([100 * x for x in t["ci95"]], abs=0.05)
    assert (int(m[4]), int(m[5])) == (t["n_questions"], t["n_seeds"])
    js = subprocess.run(
        [sys.executable, str(script), str(out), "runs/bc-k2-b0.5-l1", "runs/vft", "--seeds", "0,1", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(js.stdout)
    assert got["per_seed"] == t["per_seed"] and got["p_question"] == pytest.approx(t["p_question"])
