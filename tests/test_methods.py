"""Every training method runs end to end on the same candidates file and moves scores the intended way."""

import dataclasses
import random
import re

import pytest
import torch

from aftune.commands.align import run_align
from aftune.config import AlignConfig
from aftune.io import write_jsonl
from aftune.modeling import create_tiny, load_model_and_tokenizer
from aftune.records import Candidate, Group
from aftune.scoring import score_texts
from aftune.tasks import get_task
from aftune.tasks.arith import ArithTask
from aftune.training.arguments import AlignmentArguments
from aftune.training.methods import METHODS

TASK_ARGS = "n_train=60,n_validation=10,n_test=10"


def _corrupt(text: str, rng: random.Random) -> str:
    """A wrong solution: bump the final answer (and so the last step's result)."""
    head, ans = text.rsplit("#### ", 1)
    return f"{head}#### {int(ans) + rng.randint(1, 9)}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods")
    task = get_task("arith", n_train=60, n_validation=10, n_test=10)
    train = task.load("train")
    create_tiny(
        d / "init",
        [task.prompt(e) + e.reference for e in train],
        vocab_size=300,
        hidden_size=32,
        n_layers=1,
        n_heads=2,
    )
    rng = random.Random(0)
    groups = []
    for e in train[:16]:
        paths = list(dict.fromkeys(ArithTask.solution_paths(e, 6, rng)))[:2]
        cands = [Candidate(p, e.answer, True, rank=0, wrong_steps=0) for p in paths]
        for j, p in enumerate(paths):
            bad = _corrupt(p, rng)
            cands.append(Candidate(bad, None, False, rank=1 + j, wrong_steps=j))
        groups.append(Group(e.id, "arith", task.prompt(e), e.reference, e.answer, cands))
    write_jsonl(d / "cands.jsonl", [g.to_dict() for g in groups])
    return d, groups


def _gap(model_dir, groups):
    model, tok = load_model_and_tokenizer(str(model_dir))
    scores, _ = score_texts(model, tok, groups)
    pos = [s for g, ss in zip(groups, scores) for c, s in zip(g.candidates, ss) if c.correct]
    neg = [s for g, ss in zip(groups, scores) for c, s in zip(g.candidates, ss) if not c.correct]
    return sum(pos) / len(pos) - sum(neg) / len(neg)


def _run(d, method, **kw):
    out = d / f"run-{method}"
    cfg = AlignConfig(
        model=str(d / "init"),
        candidates=str(d / "cands.jsonl"),
        out=str(out),
        method=method,
        task_args=TASK_ARGS,
        max_steps=6,
        batch_size=8,
        lr=3e-3,
        quiet=True,
        logging_steps=1,
        save_steps=100,
        max_response_tokens=128,
        **kw,
    )
    metrics = run_align(cfg)
    return out / "model", metrics


@pytest.fixture(scope="module")
def control_gap(setup):
    d, groups = setup
    model, metrics = _run(d, "vft")
    return _gap(model, groups)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("vft",)])
def test_method_trains_and_moves_scores(setup, control_gap, method):
    d, groups = setup
    model, metrics = _run(d, method)
    assert metrics["steps"] == 6
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    if METHODS[method].loss is None:  # rft: more NLL data than the references alone
        assert metrics["n_nll_examples"] > 60
        return
    # every alignment loss widens the positive-negative score gap beyond what NLL alone does
    assert _gap(model, groups) > control_gap, method


def test_beta_help_names_every_method_that_uses_it_in_its_units():
    """--beta is nats per token for the length-normalised scores, but reward units for DPO's boundary: the help
    must say which is which for every method that reads it."""
    help_ = next(f for f in dataclasses.fields(AlignmentArguments) if f.name == "beta").metadata["help"]
    per_token, reward = re.search(r"\(([^:]+): nats per token.*; ([^:]+): reward units", help_).groups()
    listed = {"per_token": set(per_token.split(", ")), "reward": set(reward.split(", "))}
    for name, m in METHODS.items():
        if m.uses_beta:
            assert name in listed["reward" if m.needs_reference_logps else "per_token"], name
    assert listed["per_token"] | listed["reward"] == {n for n, m in METHODS.items() if m.uses_beta}
