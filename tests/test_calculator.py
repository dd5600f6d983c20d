"""The generation-time calculator: `<<expr=` is completed with the exact value, in both decoding schedules."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch

from aftune.sampling.calculator import Calculator, format_value
from aftune.sampling.sampler import SamplingConfig, generate_k
from aftune.tasks import get_task

ANNOT = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")


@pytest.fixture(scope="module")
def model_tok():
    from aftune.commands.common import load_for_inference

    return load_for_inference("arith-base")


def _prompts(n: int) -> list[str]:
    task = get_task(
        "arith", n_train=4, n_validation=2, n_test=n, min_steps=3, max_steps=4, max_number=20, max_value=200
    )
    return [task.prompt(e) for e in task.load("test")]


def _arith_ok(text: str) -> tuple[int, int]:
    ok = tot = 0
    for a, op, b, r in ANNOT.findall(text):
        a, b, r = int(a), int(b), int(r)
        tot += 1
        ok += {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else -1}[op] == r
    return ok, tot


def test_format_value():
    assert format_value(Fraction(30)) == "30"
    assert format_value(Fraction(-4)) == "-4"
    assert format_value(Fraction(5, 2)) == "2.5"
    assert format_value(Fraction(1, 3)) == "0.3333"


@pytest.mark.parametrize("continuous", [False, True])
def test_every_annotation_is_exact_and_the_model_still_chooses_the_expression(model_tok, continuous):
    model, tok = model_tok
    prompts = _prompts(12)
    cfg = SamplingConfig(k=4, max_new_tokens=96, temperature=1.0, seed=3, batch_size=4, stop=("\nQuestion:",))
    stats_on, stats_off = {}, {}
    on = generate_k(
        model,
        tok,
        prompts,
        SamplingConfig(**{**cfg.to_dict(), "calculator": True}),
        stats=stats_on,
        continuous=continuous,
    )
    off = generate_k(model, tok, prompts, cfg, stats=stats_off, continuous=continuous)
    ok_on = tot_on = ok_off = tot_off = 0
    for q_on, q_off in zip(on, off):
        for s_on, s_off in zip(q_on, q_off):
            a, b = _arith_ok(s_on.text)
            ok_on, tot_on = ok_on + a, tot_on + b
            a, b = _arith_ok(s_off.text)
            ok_off, tot_off = ok_off + a, tot_off + b
    assert tot_on > 50 and ok_on == tot_on  # with the calculator: every annotation right
    assert ok_off < tot_off  # without it this base does make arithmetic slips (the test would be empty otherwise)
    assert stats_on["calculator_tokens"] > 0 and "calculator_tokens" not in stats_off


def test_forced_tokens_carry_the_models_logprobs(model_tok):
    """A sample's logprob_sum is the model's log-prob of its final tokens, forced ones included."""
    model, tok = model_tok
    prompts = _prompts(2)
    cfg = SamplingConfig(k=2, max_new_tokens=64, temperature=1.0, seed=5, batch_size=2, calculator=True)
    for p, samples in zip(prompts, generate_k(model, tok, prompts, cfg)):
        for s in samples:
            from aftune.prompting import encode_prompt

            ids = encode_prompt(tok, p)
            full = torch.tensor([ids + s.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(full).logits[0, len(ids) - 1 : -1].float(), -1)
            want = logp.gather(-1, torch.tensor(s.token_ids).unsqueeze(-1)).sum()
            assert s.logprob_sum == pytest.approx(float(want), abs=1e-3)


def test_greedy_is_deterministic_and_off_by_default(model_tok):
    model, tok = model_tok
    prompts = _prompts(3)
    base = dict(k=1, max_new_tokens=80, temperature=0.0, batch_size=3)
    assert SamplingConfig().calculator is False
    a = generate_k(model, tok, prompts, SamplingConfig(**base, calculator=True))
    b = generate_k(model, tok, prompts, SamplingConfig(**base, calculator=True))
    assert [s.text for (s,) in a] == [s.text for (s,) in b]


def test_not_an_expression_is_left_to_the_model():
    from transformers import AutoTokenizer

    from aftune.modeling import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("arith-base"))
    calc = Calculator(tok)
    for text, queued in (("so <<3*4=", "12>>"), ("x <<cats=", None), ("<<7/2=", "3.5>>"), ("a = 3 =", None)):
        ids = tok.encode(text, add_special_tokens=False)
        tokens = torch.tensor([ids])
        calc.queue.clear()
        calc.observe(
            torch.tensor([ids[-1]]), torch.tensor([0]), torch.tensor([True]), tokens, torch.tensor([len(ids)])
        )
        got = calc.queue.get(0)
        assert (tok.decode(got) if got else None) == queued, text


def test_tasks_choose_it():
    assert get_task("arith").calculator is True
    from aftune.tasks.base import Task

    assert Task.calculator is False
