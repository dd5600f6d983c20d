"""`aftune experiment` on an arms study (docs/online.md, "The study"): one align / iterate / grpo command per arm
from each seed's VFT model, end to end on the tiny plan, resume, the compute columns, and config errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_PLAN, cli

from aftune.commands.demo import align_config
from aftune.commands.experiment import run_experiment
from aftune.commands.experiment.arms import arm_config, load_arms_study
from aftune.commands.experiment.arms_results import arm_compute, write_arms_results
from aftune.commands.experiment.shared import SeedFiles
from aftune.io import InputError

ARMS = {
    "control": {"command": "align", "method": "vft"},
    "bc_one_pass": {"command": "align", "method": "bc", "beta": 0.5},
    "bc_2_rounds": {"command": "iterate", "method": "bc", "rounds": 2, "fresh_questions": True},
    "bc_semi_online": {"command": "align", "method": "bc", "resample_every": 2},  # align_steps 4: one resampling
    "grpo_dr": {
        "command": "grpo",
        "loss_type": "dr_grpo",
        "beta": 0.0,
        "num_generations": 4,
        "batch_size": 2,
        "max_steps": 2,
        "n_questions": 8,
        "max_new_tokens": 16,
    },
}
CONFIG = dict(name="tiny-online", base="quick", plan=TINY_PLAN, sample_k=4, data_seed=0, seeds=[0, 1], arms=ARMS)
N_TEST = TINY_PLAN["n_test"]


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _json(path) -> dict:
    return json.loads(Path(path).read_text())


def _models(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("model.safetensors"))}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Seed 1 alone through the CLI (no results), then the whole study, which skips seed 1's work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine is faster on one thread
    try:
        d = tmp_path_factory.mktemp("online")
        cfg, out = _write(d / "online.yaml", CONFIG), d / "out"
        r = cli("experiment", cfg, "--out", out, "--seeds", "1", "--quiet")
        part = {
            "code": r.code,
            "stderr": r.stderr,
            "stdout": r.stdout,
            "results": (out / "results-online.md").exists(),
            "seed0": (out / "seed0").exists(),
            "seed1_models": _models(out / "seed1"),
        }
        res = run_experiment(cfg, out=str(out), quiet=True)
        yield d, cfg, out, part, res
    finally:
        torch.set_num_threads(threads)


def test_one_seed_runs_its_arms_and_writes_no_results(study):
    _, _, out, part, res = study
    assert part["code"] == 0, part["stderr"]
    assert "run without --seeds" in part["stdout"] and not part["results"] and not part["seed0"]
    # the align and grpo arms' models, and the iterate arm's one per round
    assert len([p for p in part["seed1_models"] if "online" in p.parts]) == 4 + 2
    assert _models(out / "seed1") == part["seed1_models"]  # the run over all seeds did not redo seed 1
    assert {f"seed1/online {a}" for a in ARMS} <= set(res["skipped"])


def test_arms_study_end_to_end(study):
    _, _, out, _, res = study
    results = _json(out / "results.json")
    arms = {a["arm"]: a for a in results["arms"]}
    assert list(arms) == list(ARMS) and res["n_runs"] == 2 * len(ARMS)
    md = (out / "results-online.md").read_text()
    assert all(f"| {a} | {ARMS[a]['command']} |" in md for a in ARMS) and "| VFT (start) |" in md
    for png in ("accuracy_vs_generated_tokens", "accuracy_vs_wall_time", "delta_vs_control", "accuracy"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}.png" in md

    ctl = arms["control"]["vs_control"]
    assert (ctl["diff"], ctl["se_question"], ctl["p_question"], ctl["ci95"]) == (0.0, 0.0, 1.0, [0.0, 0.0])  # itself
    assert [(x["b"], x["c"], x["p_mcnemar"]) for x in ctl["per_seed"]] == [(0, 0, 1.0)] * 2
    for name, a in arms.items():
        d = {s: out / f"seed{s}" / "online" / name for s in (0, 1)}
        assert a["test_acc"]["values"] == [_json(d[s] / "eval.json")["accuracy"] for s in (0, 1)]
        t = a["vs_control"]
        assert (t["n_questions"], t["n_seeds"]) == (N_TEST, 2)
        assert t["diff"] == pytest.approx(a["test_acc"]["mean"] - arms["control"]["test_acc"]["mean"])
        for s in (0, 1):
            assert len((d[s] / "eval.predictions.jsonl").read_text().splitlines()) == N_TEST
            cfg = yaml.safe_load((d[s] / "run" / "config.yaml").read_text())
            assert cfg["model"] == str(out / f"seed{s}" / "vft" / "model")  # every arm starts from the seed's VFT
            assert _json(d[s] / "arm.json") == {k: v for k, v in ARMS[name].items()}
        assert not list(d[0].rglob("checkpoints"))  # a finished arm keeps its model only
        c = a["compute"]
        assert c["tokens_scored"] > 0 and c["optimizer_steps"] > 0 and c["wall_seconds"] > 0
        assert c["train_seconds"] > 0
        # the control reads no sampled candidates, so it is charged no sampling; every other arm sampled
        assert (c["generated_tokens"] == 0) if name == "control" else (c["generated_tokens"] > 0)

    for s in (0, 1):
        run = {a: out / f"seed{s}" / "online" / a / "run" for a in ARMS}
        per = {a: arms[a]["per_seed"][str(s)] for a in ARMS}
        shared = _json(out / f"seed{s}" / "candidates.k4.jsonl.meta.json")["stats"]
        # one pass: charged the shared sampling pass it trains on (tokens and the sampler's seconds)
        assert per["bc_one_pass"]["generated_tokens"] == shared["generated_tokens"] > 0
        assert per["bc_one_pass"]["sample_seconds"] == pytest.approx(shared["wall_s"], abs=1e-3)
        assert per["bc_one_pass"]["optimizer_steps"] == TINY_PLAN["align_steps"]
        # semi-online: that pass + its resampling at step 2, drawn like the pass (k=4)
        semi = _json(run["bc_semi_online"] / "metrics.json")["compute"]
        assert semi["resamples"] == 1 and semi["generated_tokens"] > 0
        assert per["bc_semi_online"]["generated_tokens"] == shared["generated_tokens"] + semi["generated_tokens"]
        semi_cfg = yaml.safe_load((run["bc_semi_online"] / "config.yaml").read_text())
        assert (semi_cfg["resample_every"], semi_cfg["resample_k"]) == (2, 4)
        # iterate: its own rounds (fresh questions, sampled from the round's model), summed
        it = _json(run["bc_2_rounds"] / "metrics.json")
        assert per["bc_2_rounds"]["generated_tokens"] == it["total"]["generated_tokens"] > 0
        assert per["bc_2_rounds"]["optimizer_steps"] == 2 * TINY_PLAN["align_steps"]
        it_cfg = yaml.safe_load((run["bc_2_rounds"] / "config.yaml").read_text())
        assert it_cfg["candidates"] == "" and it_cfg["n_questions"] == TINY_PLAN["n_sample"] and it_cfg["k"] == 4
        # its last round's greedy accuracy is the study's eval of its final model
        assert (
            it["rounds"][-1]["accuracy"]
            == _json(out / f"seed{s}" / "online" / "bc_2_rounds" / "eval.json")["accuracy"]
        )
        # grpo: its rollouts, TRL's steps
        g = _json(run["grpo_dr"] / "metrics.json")
        assert per["grpo_dr"]["generated_tokens"] == g["compute"]["generated_tokens"] > 0
        assert per["grpo_dr"]["optimizer_steps"] == g["steps"] == 2 and g["method"] == "grpo:dr_grpo"
    curve = arms["bc_2_rounds"]["curve"]
    assert [p["round"] for p in curve] == [1, 2] and 0 < curve[0]["generated_tokens"] < curve[1]["generated_tokens"]
    assert curve[1]["generated_tokens"] == arms["bc_2_rounds"]["compute"]["generated_tokens"]
    assert all(len(a["curve"]) == 1 for n, a in arms.items() if n != "bc_2_rounds")


def test_rerun_skips_every_finished_arm(study):
    _, cfg, out, _, res = study
    before = _models(out)
    assert len([p for p in before if "online" in p.parts]) == 2 * (4 + 2)
    res2 = run_experiment(cfg, out=str(out), quiet=True)
    assert _models(out) == before
    assert {f"seed{s}/{kind} {a}" for s in (0, 1) for kind in ("online", "eval online") for a in ARMS} <= set(
        res2["skipped"]
    )
    assert res2["arms"] == res["arms"]


def test_results_are_rebuilt_from_the_prediction_files(study, tmp_path):
    """The paired test reads each arm's and the control's per-question predictions of the same seed: two questions
    bc_one_pass now gets right on seed 0 move its difference to the control by 2 / (2 x N_TEST)."""
    _, cfg, out, _, _ = study
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = {a["arm"]: a for a in _json(out / "results.json")["arms"]}["bc_one_pass"]
    d = copy / "seed0" / "online" / "bc_one_pass"
    preds = [json.loads(line) for line in (d / "eval.predictions.jsonl").read_text().splitlines()]
    wrong = [p for p in preds if not p["correct"]][:2]
    assert len(wrong) == 2
    for p in wrong:
        p["correct"] = True
    (d / "eval.predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    ev = _json(d / "eval.json")
    ev["accuracy"] = sum(p["correct"] for p in preds) / len(preds)
    (d / "eval.json").write_text(json.dumps(ev))
    study_ = load_arms_study(cfg)
    after = {a["arm"]: a for a in write_arms_results(copy, copy, study_)["arms"]}["bc_one_pass"]
    t0, t1 = before["vs_control"], after["vs_control"]
    assert t1["diff"] == pytest.approx(t0["diff"] + 2 / (2 * N_TEST))
    b0, b1 = t0["per_seed"][0], t1["per_seed"][0]
    assert b1["b"] - b1["c"] == b0["b"] - b0["c"] + 2 and t1["per_seed"][1] == t0["per_seed"][1]
    assert after["test_acc"]["values"][0] == pytest.approx(before["test_acc"]["values"][0] + 2 / N_TEST)
    assert after["compute"] == before["compute"]


def test_changed_arm_settings_are_refused(study, tmp_path):
    _, _, out, _, _ = study
    arms = {**ARMS, "bc_one_pass": {**ARMS["bc_one_pass"], "beta": 0.25}}
    cfg = _write(tmp_path / "c.yaml", {**CONFIG, "arms": arms})
    with pytest.raises(InputError, match="other settings") as e:
        run_experiment(cfg, out=str(out), quiet=True)
    assert "field 'arms.bc_one_pass'" in str(e.value) and "beta" in str(e.value)


def test_changed_plan_under_the_same_out_is_refused(study, tmp_path):
    _, _, out, _, _ = study
    cfg = _write(tmp_path / "c.yaml", {**CONFIG, "plan": {**TINY_PLAN, "align_steps": 5}})
    with pytest.raises(InputError, match="different plan"):
        run_experiment(cfg, out=str(out), quiet=True)


def test_a_grid_study_in_the_same_out_reuses_the_shared_steps(study, tmp_path):
    """The grid kind with the same plan finds each seed's VFT model, sampling pass and VFT eval done; its bc cell is
    the one-pass arm's run under another name."""
    _, _, out, _, _ = study
    vft = _models(out / "seed0" / "vft") | _models(out / "seed1" / "vft")
    grid = dict(
        name="grid",
        base="quick",
        plan=TINY_PLAN,
        seeds=[0, 1],
        methods=["bc"],
        k=[4],
        beta=[0.5],
        report=str(tmp_path / "report"),
        **{"lambda": [1.0]},
    )
    res = run_experiment(_write(tmp_path / "grid.yaml", grid), out=str(out), quiet=True)
    shared = ("sft (VFT start)", "sample (train, k=4)", "sample (assess)", "eval VFT (start)")
    assert {f"seed{s}/{n}" for s in (0, 1) for n in shared} <= set(res["skipped"])
    assert _models(out / "seed0" / "vft") | _models(out / "seed1" / "vft") == vft
    for s in (0, 1):
        cell = yaml.safe_load((out / f"seed{s}" / "runs" / "bc-k4-b0.5-l1" / "config.yaml").read_text())
        arm = yaml.safe_load((out / f"seed{s}" / "online" / "bc_one_pass" / "run" / "config.yaml").read_text())
        assert cell["resample_every"] == arm["resample_every"] == 0  # so the resample_* settings are inert

        def same(c: dict) -> dict:
            return {k: v for k, v in c.items() if k != "out" and not k.startswith("resample_")}

        assert same(cell) == same(arm)
    assert (tmp_path / "report" / "results.md").exists() and not (tmp_path / "report" / "results-online.md").exists()


def test_arm_configs_take_the_study_defaults_then_the_arm(tmp_path):
    arms = {
        "control": {"command": "align", "method": "vft"},
        "bc": {"command": "align", "method": "bc", "beta": 0.25, "lambda": 2.0},
        "it": {"command": "iterate", "method": "dpo", "rounds": 3, "candidates": "shared", "lambda": 0.5},
        "g": {"command": "grpo", "loss_type": "dapo", "num_generations": 4},
    }
    study = load_arms_study(_write(tmp_path / "s.yaml", {**CONFIG, "arms": arms}))
    files = SeedFiles(
        common=dict(task="arith", task_args="seed=0,n_train=120", seed=3, quiet=True, bf16=False),
        vft_model="S/vft/model",
        candidates={4: Path("S/candidates.k4.jsonl")},
        assess=Path("S/assess_candidates.jsonl"),
        eval_args={},
    )
    by = {a.name: a for a in study.arms}
    bc = arm_config(study, by["bc"], files, Path("S/online/bc"))
    ref = align_config(study.plan, files.common, files.vft_model, files.candidates[4], files.assess, Path("x"), "bc")
    assert (bc.beta, bc.lambda_, bc.max_candidates, bc.out) == (0.25, 2.0, 5, "S/online/bc/run")
    assert (bc.max_steps, bc.lr, bc.batch_size, bc.candidates) == (
        ref.max_steps,
        ref.lr,
        ref.batch_size,
        ref.candidates,
    )
    it = arm_config(study, by["it"], files, Path("S/online/it"))
    assert (it.method, it.rounds, it.lambda_, it.candidates) == ("dpo", 3, 0.5, "S/candidates.k4.jsonl")
    assert (it.model, it.max_steps, it.n_questions, it.k) == ("S/vft/model", ref.max_steps, TINY_PLAN["n_sample"], 4)
    assert (it.eval_split, it.eval_questions, it.seed) == ("test", None, 3)
    g = arm_config(study, by["g"], files, Path("S/online/g"))
    assert (g.model, g.loss_type, g.num_generations, g.task_args, g.seed) == (
        "S/vft/model",
        "dapo",
        4,
        "seed=0,n_train=120",
        3,
    )
    assert by["it"].shared_candidates and by["it"].spec["candidates"] == "shared"


def test_arm_compute_by_hand():
    shared = {"generated_tokens": 1000, "wall_s": 10.0}
    align = {"compute": {"generated_tokens": 0, "tokens_scored": 500, "optimizer_steps": 4, "train_seconds": 2.0}}
    c = arm_compute("align", align, shared)
    assert (c["generated_tokens"], c["tokens_scored"], c["optimizer_steps"], c["wall_seconds"]) == (1000, 500, 4, 12.0)
    assert arm_compute("align", align, None)["generated_tokens"] == 0  # the control: no sampling charged
    semi = {"compute": {**align["compute"], "generated_tokens": 300, "train_seconds": 5.0}}
    c = arm_compute("align", semi, shared)
    assert (c["generated_tokens"], c["sample_seconds"], c["train_seconds"], c["wall_seconds"]) == (
        1300,
        10.0,
        5.0,
        15.0,
    )
    rounds = [
        {"round": 0, "accuracy": 0.1, "compute": {}},
        *(
            {
                "round": r,
                "accuracy": 0.1 * (r + 1),
                "compute": {
                    "generated_tokens": 100 * r,
                    "tokens_scored": 10,
                    "optimizer_steps": 4,
                    "sample": {"wall_s": 1.0},
                    "train": {"train_seconds": 2.0},
                },
            }
            for r in (1, 2)
        ),
    ]
    c = arm_compute("iterate", {"rounds": rounds}, None)
    assert (c["generated_tokens"], c["tokens_scored"], c["optimizer_steps"], c["wall_seconds"]) == (300, 20, 8, 6.0)
    assert [(p["round"], p["generated_tokens"], p["wall_seconds"], p["test_acc"]) for p in c["points"]] == [
        (1, 100, 3.0, pytest.approx(0.2)),
        (2, 300, 6.0, pytest.approx(0.3)),
    ]
    g = arm_compute(
        "grpo",
        {"compute": {"generated_tokens": 77, "tokens_scored": 9, "optimizer_steps": 2, "train_seconds": 4.0}},
        None,
    )
    assert (g["generated_tokens"], g["sample_seconds"], g["wall_seconds"]) == (77, None, 4.0)  # sampling inside steps


@pytest.mark.parametrize(
    "arm, key, message",
    [
        ({"command": "ppo"}, "arms.x.command", "expected one of: align, iterate, grpo"),
        ({"command": "align", "method": "bc", "betta": 0.5}, "arms.x.betta", "unknown field of `aftune align`"),
        ({"command": "grpo", "method": "bc"}, "arms.x.method", "unknown field of `aftune grpo`"),
        ({"command": "align", "method": "bc", "model": "m"}, "arms.x.model", "set by the study"),
        ({"command": "align"}, "arms.x.method", "needs a method"),
        ({"command": "align", "method": "nope"}, "arms.x.method", "unknown method 'nope'"),
        ({"command": "iterate", "method": "bc", "rounds": "three"}, "arms.x.rounds", "expected int"),
        ({"command": "iterate", "method": "bc", "rounds": 0}, "arms.x.rounds", ">= 1"),
        ({"command": "iterate", "method": "bc", "candidates": "c.jsonl"}, "arms.x.candidates", "candidates: shared"),
        ({"command": "align", "method": "dpo", "resample_every": 2}, "arms.x.resample_every", "log-probs"),
        ({"command": "grpo", "loss_type": "ppo"}, "arms.x.loss_type", "dr_grpo"),
        ("bc", "arms.x", "expected a mapping"),
    ],
)
def test_bad_arm_names_file_line_and_field(tmp_path, arm, key, message):
    path = _write(tmp_path / "bad.yaml", {**CONFIG, "arms": {"control": ARMS["control"], "x": arm}})
    with pytest.raises(InputError, match=message) as e:
        load_arms_study(path)
    assert str(path) in str(e.value) and f"field '{key}'" in str(e.value)
    lines = Path(path).read_text().splitlines()
    field = key.split(".")[-1]
    where = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("x:"))
    if field != "x" and isinstance(arm, dict) and field in arm:  # the arm's own line of that field
        where = next(i for i, line in enumerate(lines, 1) if i > where and line.strip().startswith(f"{field}:"))
    assert e.value.line == where


@pytest.mark.parametrize(
    "data, key, message",
    [
        ({"arms": {"x": ARMS["bc_one_pass"]}}, "arms", "an arm named 'control'"),
        ({"methods": ["bc"]}, "methods", "no grid keys"),
        ({"arms": ["control"]}, "arms", "expected a mapping"),
        ({"arms": {"a/b": ARMS["control"], "control": ARMS["control"]}}, "arms.a/b", "folder name"),
        ({"plan": {"vft_stps": 3}}, "plan.vft_stps", "unknown plan field"),
        ({"metods": 1}, "metods", "unknown key"),
    ],
)
def test_bad_study_names_the_key(tmp_path, data, key, message):
    path = _write(tmp_path / "bad.yaml", {**CONFIG, **data})
    with pytest.raises(InputError, match=message) as e:
        load_arms_study(path)
    assert f"field '{key}'" in str(e.value)


def test_cli_reports_a_bad_arm_as_one_error_line(tmp_path):
    path = _write(
        tmp_path / "bad.yaml", {**CONFIG, "arms": {**ARMS, "x": {"command": "align", "method": "bc", "bta": 1}}}
    )
    r = cli("experiment", path, "--out", tmp_path / "out")
    assert r.code == 2 and "field 'arms.x.bta'" in r.stderr and "unknown field" in r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_shipped_online_study_shares_main_and_is_sized_like_its_comments():
    """online.yaml reuses main.yaml's folder (same fingerprint), and the online arms get the sampling budget their
    comments give: S = 3 rounds x questions x k for the iterate arms, 3 semi-online resamplings of the same size,
    and as many GRPO completions."""
    from aftune.commands.experiment import load_experiment
    from aftune.commands.experiment.shared import fingerprint

    root = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    study, main = load_arms_study(root / "online.yaml"), load_experiment(root / "main.yaml")
    assert (study.out, study.seeds) == (main.out, main.seeds)
    assert fingerprint(study.plan, study.data_seed, study.bf16, study.kmax, study.diag_every) == fingerprint(
        main.plan, main.data_seed, main.bf16, main.kmax, main.diag_every
    )
    files = SeedFiles(
        common=dict(task="arith", task_args="", seed=0, quiet=True, bf16=False),
        vft_model="V",
        candidates={study.kmax: Path("C")},
        assess=Path("A"),
        eval_args={},
    )
    cfg = {a.name: arm_config(study, a, files, Path("D")) for a in study.arms}
    one_pass = study.plan.n_sample * study.kmax  # samples in the shared pass
    budget = 3 * study.plan.n_train * 8
    assert budget == 1.5 * one_pass
    for name in ("aft_bc_3_rounds", "iterative_rpo_3_rounds"):
        c = cfg[name]
        assert c.rounds * c.n_questions * c.k == budget and c.max_steps == study.plan.align_steps
        assert not c.fresh_questions and not c.candidates
    semi = cfg["aft_bc_semi_online"]
    resamplings = len(range(semi.resample_every, semi.max_steps, semi.resample_every))  # after t < max_steps
    assert resamplings * study.plan.n_train * semi.resample_k == budget and semi.resample_every * 4 == semi.max_steps
    g = cfg["grpo_dr"]
    assert g.max_steps * g.batch_size * g.num_generations == budget
    assert g.max_steps * g.batch_size == 3 * g.n_questions  # three epochs of its prompts
    assert (g.loss_type, g.beta, g.num_generations) == ("dr_grpo", 0.0, 8)
    assert {a.name for a in study.arms} >= {"control", "rft", "aft_bc_one_pass", "aft_dc_one_pass"}
