"""Beyond one sampling pass: `aftune iterate` rounds, semi-online resampling inside `aftune align`, `aftune grpo`
through TRL, and the compute accounting every run reports (docs/online.md).

Kill-and-resume checks use real processes killed with SIGKILL (as tests/test_crash_resume.py does); the
uninterrupted references and the final resumes run in-process through the same CLI entry point.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TASK_ARGS, cli, start_cli
from safetensors.torch import load_file
from test_crash_resume import _kill_when

from aftune.records import read_groups

SMALL = ["--task-args", TASK_ARGS, "--quiet"]
ITERATE = [
    *SMALL,
    "--rounds",
    "2",
    "--fresh-questions",
    "--n-questions",
    "6",
    "--k",
    "4",
    "--max-new-tokens",
    "24",
    "--sample-batch-size",
    "2",
    "--method",
    "bc",
    "--max-steps",
    "6",
    "--save-steps",
    "2",
    "--logging-steps",
    "1",
    "--batch-size",
    "2",
    "--eval-questions",
    "8",
]


def _params(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-4, atol=1e-5, msg=name)


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _group_tokens(path: Path) -> int:
    return sum(g.meta["generated_tokens"] for g in read_groups(path))


def test_iterate_runs_rounds_and_accounts_compute(tiny_model, tmp_path):
    out = tmp_path / "it"
    r = cli("iterate", "--model", tiny_model, "--out", out, *ITERATE)
    assert r.code == 0, r.stderr
    m = _json(out / "metrics.json")
    assert [x["round"] for x in m["rounds"]] == [0, 1, 2]
    cum_gen = cum_scored = 0
    ids = []
    for rnd in m["rounds"][1:]:
        d = out / f"round{rnd['round']}"
        cands = d / f"candidates.shard{rnd['round'] - 1}of2.jsonl"
        groups = read_groups(cands)
        ids.append({g.id for g in groups})
        assert len(groups) == 6  # --n-questions per round: shard r-1 of 2 of the first 12
        align = _json(d / "metrics.json")
        c = rnd["compute"]
        # tokens generated == the sampled candidates' token counts (every sample, duplicates too)
        assert c["generated_tokens"] == c["sample_generated_tokens"] == _group_tokens(cands) > 0
        assert c["generated_tokens"] == _json(Path(f"{cands}.meta.json"))["stats"]["generated_tokens"]
        assert c["tokens_scored"] == align["compute"]["tokens_scored"] > 0
        assert align["compute"]["tokens_scored"] == (
            align["compute"]["nll_tokens_scored"] + align["compute"]["candidate_tokens_scored"]
        )
        assert align["compute"]["candidate_tokens_scored"] > 0 and c["optimizer_steps"] == 6
        assert rnd["accuracy"] == _json(d / "eval.json")["accuracy"]
        cum_gen, cum_scored = cum_gen + c["generated_tokens"], cum_scored + c["tokens_scored"]
        assert rnd["cumulative"]["generated_tokens"] == cum_gen and rnd["cumulative"]["tokens_scored"] == cum_scored
        assert (d / "model" / "model.safetensors").exists()
    assert not ids[0] & ids[1], "--fresh-questions must give each round other questions"
    # round 2 continues round 1's model: its align run starts from it
    assert _json(out / "round2" / "metrics.json")["model"].endswith("round2/model")
    assert Path(yaml.safe_load((out / "round2" / "config.yaml").read_text())["model"]) == out / "round1" / "model"
    assert m["total"]["generated_tokens"] == cum_gen and m["final_accuracy"] == m["rounds"][-1]["accuracy"]
    report = (out / "report.md").read_text()
    assert "accuracy.png" in report and (out / "accuracy.png").stat().st_size > 0
    last = m["rounds"][2]
    assert f"| 2 | {100 * last['accuracy']:.1f}% | {last['compute']['generated_tokens']} |" in report


def test_iterate_killed_in_round2_resumes_to_the_straight_run(tiny_model, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "crash"
    args = ["iterate", "--model", tiny_model, *ITERATE]
    r = cli(*args, "--out", ref)
    assert r.code == 0, r.stderr
    # a random moment after round 2's first checkpoint: in the middle of round 2's align
    kill_after = out / "round2" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    proc = start_cli(*args, "--out", out)
    assert _kill_when(proc, kill_after.exists, random.Random(3), max_delay=0.15), "finished before the kill"
    assert (out / "round1" / "eval.json").exists() and not (out / "round2" / "metrics.json").exists()
    r = cli(*args, "--out", out)
    assert r.code == 0, r.stderr
    assert "round1 align: already done" in r.stdout and "resuming from" in r.stderr
    for rnd in (1, 2):
        _assert_same_weights(ref / f"round{rnd}" / "model", out / f"round{rnd}" / "model")
    mr, mo = _json(ref / "metrics.json"), _json(out / "metrics.json")
    for a, b in zip(mr["rounds"], mo["rounds"]):
        assert a["accuracy"] == b["accuracy"]
        for key in ("generated_tokens", "tokens_scored", "optimizer_steps"):
            assert a["compute"].get(key) == b["compute"].get(key), (a["round"], key)
    la = [(e["step"], e["loss"]) for e in _json(ref / "round2" / "metrics.json")["log_history"] if "loss" in e]
    lb = [(e["step"], e["loss"]) for e in _json(out / "round2" / "metrics.json")["log_history"] if "loss" in e]
    assert [s for s, _ in la] == [s for s, _ in lb] and lb
    assert [x for _, x in lb] == pytest.approx([x for _, x in la], rel=1e-4, abs=1e-5)


def _semi_online(tiny_model, candidates) -> list:
    return [
        "align",
        "--model",
        tiny_model,
        "--candidates",
        candidates,
        *SMALL,
        "--method",
        "bc",
        "--max-steps",
        "8",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--batch-size",
        "2",
        "--resample-every",
        "3",
        "--resample-k",
        "4",
        "--resample-max-new-tokens",
        "24",
        "--resample-batch-size",
        "4",
    ]


def test_semi_online_resamples_from_the_current_model_and_resumes_exactly(tiny_model, candidates, tmp_path):
    args = _semi_online(tiny_model, candidates)
    ref, out = tmp_path / "ref", tmp_path / "crash"
    r = cli(*args, "--out", ref)
    assert r.code == 0, r.stderr
    m = _json(ref / "metrics.json")
    assert [x["step"] for x in m["resamples"]] == [3, 6]  # S, 2S < max_steps
    initial = {g.id: [c.text for c in g.candidates] for g in read_groups(candidates)}
    files = [ref / "resample" / f"step{t}.jsonl" for t in (3, 6)]
    sets = [{g.id: [c.text for c in g.candidates] for g in read_groups(f)} for f in files]
    assert set(sets[0]) == set(initial)  # every training question, regraded
    assert sets[0] != initial and sets[1] != sets[0], "resampling must change the candidates"
    for f in files:
        assert all(g.meta["resampled_at_step"] == int(f.stem[4:]) for g in read_groups(f))
    c = m["compute"]
    assert c["resamples"] == 2 and c["generated_tokens"] == sum(_group_tokens(f) for f in files) > 0
    assert c["generated_tokens"] == sum(x["generated_tokens"] for x in m["resamples"])

    # SIGKILL after the checkpoint at step 4 (candidates resampled at 3 in use), then resume
    proc = start_cli(*args, "--out", out)
    kill_after = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    assert _kill_when(proc, kill_after.exists, random.Random(5), max_delay=0.1), "finished before the kill"
    assert not (out / "metrics.json").exists()
    r = cli(*args, "--out", out)
    assert r.code == 0, r.stderr
    assert "resuming from" in r.stderr
    for t in (3, 6):  # the same candidates as the straight run
        assert (out / "resample" / f"step{t}.jsonl").read_bytes() == (ref / "resample" / f"step{t}.jsonl").read_bytes()
    _assert_same_weights(ref / "model", out / "model")
    mo = _json(out / "metrics.json")
    for key in ("generated_tokens", "nll_tokens_scored", "candidate_tokens_scored", "optimizer_steps", "resamples"):
        assert mo["compute"][key] == c[key], key
    la = {e["step"]: e["align_loss"] for e in m["log_history"] if "align_loss" in e}
    lb = {e["step"]: e["align_loss"] for e in mo["log_history"] if "align_loss" in e}
    assert la.keys() == lb.keys() and all(lb[s] == pytest.approx(la[s], rel=1e-4, abs=1e-5) for s in la)


def test_semi_online_refuses_methods_that_need_the_start_models_log_probs(tiny_model, candidates, tmp_path):
    r = cli(
        "align",
        "--model",
        tiny_model,
        "--candidates",
        candidates,
        *SMALL,
        "--method",
        "dpo",
        "--resample-every",
        "2",
        "--out",
        tmp_path / "x",
    )
    assert r.code == 2 and "--resample-every" in r.stderr and "log-probs" in r.stderr
    assert not (tmp_path / "x").exists()


def test_sample_counts_every_generated_token(tiny_model, tmp_path):
    from aftune.commands.common import load_for_inference
    from aftune.sampling.sampler import SamplingConfig, generate_k
    from aftune.sampling.store import sample_candidates
    from aftune.tasks import get_task

    model, tok = load_for_inference(str(tiny_model))
    task = get_task("arith", n_train=200, n_validation=20, n_test=20)
    seen = []

    def counting(prompts, cfg, seeds=None, on_done=None):  # the engine contract sample_candidates calls
        out = generate_k(model, tok, prompts, cfg, seeds=seeds, on_done=on_done)
        seen.extend(s.n_tokens for q in out for s in q)
        return out

    cfg = SamplingConfig(k=4, max_new_tokens=24, temperature=1.0, batch_size=2, stop=task.stop)
    path = tmp_path / "c.jsonl"
    first = sample_candidates(
        model, tok, task, task.load("train")[:3], path, cfg, model_name="t", progress=False, generate=counting
    )
    assert first["new_generated_tokens"] == first["generated_tokens"] == sum(seen) == _group_tokens(path) > 0
    more = sample_candidates(
        model, tok, task, task.load("train")[:5], path, cfg, model_name="t", progress=False, generate=counting
    )  # resumes: 2 new questions
    assert more["new_generated_tokens"] == sum(seen) - first["generated_tokens"]
    assert more["generated_tokens"] == sum(seen) == _group_tokens(path)


def test_grpo_task_reward_grades_like_the_task(tmp_path):
    from aftune.commands.grpo import TaskReward
    from aftune.tasks import get_task

    task = get_task("arith", n_train=20, n_validation=2, n_test=2)
    ex = task.load("train")[0]
    reward = TaskReward({"q": (task, ex)}, stop=task.stop)
    wrong = ex.reference.rsplit("####", 1)[0] + f"#### {int(ex.answer) + 1}"
    assert reward(
        prompts=["p"] * 3,
        completions=[ex.reference, wrong, ex.reference + "\nQuestion: 1 + 1?\n#### 7"],
        example_id=["q"] * 3,
    ) == [1.0, 0.0, 1.0]  # cut at the stop string before grading
    # GSM8K: the "#### answer" line decides, with its number normalisation (commas, trailing ".")
    from aftune.records import Example
    from aftune.tasks.gsm8k import GSM8KTask

    gsm8k = GSM8KTask(data_dir=str(tmp_path))
    g = Example(id="g", question="q", reference="", answer="1234")
    r = TaskReward({"g": (gsm8k, g)}, stop=gsm8k.stop)
    assert r(
        prompts=["p"] * 3, completions=["4 x 308.5 = 1234\n#### 1,234", "#### 1235", "no answer"], example_id=["g"] * 3
    ) == [1.0, 0.0, 0.0]
    assert [r_ == 1.0 for r_ in r(prompts=["p"], completions=["#### 1234"], example_id=["g"])] == [
        gsm8k.grade("#### 1234", g).correct
    ]


@pytest.mark.parametrize("rollout", ["trl", "aftune"])
def test_grpo_trains_through_trl_and_writes_an_evaluable_model(tiny_model, tmp_path, rollout):
    out = tmp_path / "grpo"
    r = cli(
        "grpo",
        "--rollout",
        rollout,
        "--model",
        tiny_model,
        *SMALL,
        "--n-questions",
        "8",
        "--num-generations",
        "4",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "16",
        "--max-steps",
        "2",
        "--logging-steps",
        "1",
        "--save-steps",
        "2",
        "--loss-type",
        "dr_grpo",
        "--beta",
        "0.04",
        "--eval-questions",
        "6",
        "--out",
        out,
    )
    assert r.code == 0, r.stderr
    m = _json(out / "metrics.json")
    assert m["steps"] == 2 and m["accuracy"] == _json(out / "eval.json")["accuracy"]
    steps = [e for e in m["log_history"] if "reward" in e]
    assert len(steps) == 2 and all(0.0 <= e["reward"] <= 1.0 for e in steps)
    # every generated completion token counted: per step 2 prompts x 4 completions x their mean length
    assert m["compute"]["generated_tokens"] == pytest.approx(sum(8 * e["completions/mean_length"] for e in steps))
    assert m["compute"]["tokens_scored"] == 2 * m["compute"]["trl_num_input_tokens_seen"]  # policy + reference
    r = cli("eval", "--model", out / "model", *SMALL, "--n-questions", "4", "--out", tmp_path / "e.json")
    assert r.code == 0, r.stderr


class _FakeTrainer:
    """What SamplerRollout reads of a GRPOTrainer: the model, the step, the group size."""

    def __init__(self, model, step=0):
        import types

        self.model, self.num_generations = model, 3
        self.state = types.SimpleNamespace(global_step=step)
        self.accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)


def test_grpo_sampler_rollout_groups_repeated_prompts_and_is_reproducible(tiny_model):
    from aftune.commands.common import load_for_inference
    from aftune.commands.grpo import SamplerRollout
    from aftune.config import GRPORunConfig
    from aftune.prompting import encode_prompt

    model, tok = load_for_inference(str(tiny_model))
    cfg = GRPORunConfig(max_new_tokens=12, temperature=1.0)
    prompts = ["Question: a?\nAnswer:\n"] * 4 + ["Question: b?\nAnswer:\n"] * 4  # TRL's order: G in a row
    out = SamplerRollout(tok, cfg, ("\nQuestion:",), calculator=True)(prompts, _FakeTrainer(model))
    assert len(out["completion_ids"]) == 8 and len(out["prompt_ids"]) == 8
    assert out["prompt_ids"][0] == encode_prompt(tok, prompts[0]) and out["prompt_ids"][4] == encode_prompt(
        tok, prompts[4]
    )
    for ids, lps in zip(out["completion_ids"], out["logprobs"]):
        assert len(ids) == len(lps) > 0 and all(lp <= 0 for lp in lps)
    again = SamplerRollout(tok, cfg, ("\nQuestion:",), calculator=True)(prompts, _FakeTrainer(model))
    assert again["completion_ids"] == out["completion_ids"]  # same step, same call: same draws (resume)
    roll = SamplerRollout(tok, cfg, ("\nQuestion:",), calculator=True)
    first = roll(prompts, _FakeTrainer(model))
    second = roll(prompts, _FakeTrainer(model))  # a second generation within the same step: new draws
    assert first["completion_ids"] == out["completion_ids"] and second["completion_ids"] != first["completion_ids"]
    once = SamplerRollout(tok, cfg, (), calculator=False)(prompts[::4], _FakeTrainer(model))
    assert len(once["completion_ids"]) == 2 * 3  # prompts given once: num_generations each
    with pytest.raises(ValueError, match="same number of times"):
        SamplerRollout(tok, cfg, (), calculator=False)(prompts[:5], _FakeTrainer(model))
