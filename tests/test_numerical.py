"""Numerical faults: a diverging run stops with one error line and keeps its last good checkpoint;
empty responses never divide by zero."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

from aftune.scoring import Scored, score_groups


def _diverge(*extra):
    # lr 1e39 overflows float32: the first step at full lr makes the weights inf.
    return ["--lr", "1e39", "--task-args", "n_train=200", "--batch-size", "2", "--quiet", *extra]


def test_align_diverging_weights_are_not_checkpointed(tiny_model, candidates, tmp_path):
    out = tmp_path / "a"
    # linear warm-up over 1 step: step 1 runs at lr 0 (a good checkpoint-1), step 2 at lr 1e39
    r = cli(
        "align",
        "--model",
        tiny_model,
        "--candidates",
        candidates,
        "--max-steps",
        "4",
        "--save-steps",
        "1",
        "--warmup-ratio",
        "0.25",
        "--lr-schedule",
        "linear",
        *_diverge("--out", out),
    )
    assert r.code == 1 and "Traceback" not in r.stderr
    assert len(r.error_lines) == 1, r.stderr
    assert re.fullmatch(
        r"error: parameter \S+ became non-finite at step 2; stopping without saving\. The last saved "
        rf"checkpoint in {re.escape(str(out / 'checkpoints'))} is intact\. .+",
        r.error_lines[0],
    )
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-1"]
    assert json.loads((out / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    kept = load_file(str(out / "checkpoints" / "checkpoint-1" / "model.safetensors"))
    start = load_file(str(tiny_model / "model.safetensors"))
    for name, value in kept.items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, start[name], msg=name)  # lr 0 at step 1: the start weights
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_sft_nan_loss_stops_with_one_error_line(tiny_model, tmp_path):
    out = tmp_path / "s"
    r = cli(
        "sft",
        "--model",
        tiny_model,
        "--task",
        "arith",
        "--max-steps",
        "4",
        "--eval-steps",
        "10",
        "--n-validation",
        "4",
        "--no-eval-accuracy",
        *_diverge("--out", out),
    )
    assert r.code == 1 and "Traceback" not in r.stderr
    assert len(r.error_lines) == 1, r.stderr
    assert re.fullmatch(
        r"error: loss became (nan|inf|-inf) at step \d+; stopping\. The last saved checkpoint in "
        rf"{re.escape(str(out / 'checkpoints'))} is intact\. .+",
        r.error_lines[0],
    )
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_mean_score_of_an_empty_response_is_zero_with_finite_gradient():
    logp = torch.tensor([0.0, -3.0, -1.0], requires_grad=True)
    s = Scored(logp_sum=logp, n_tokens=torch.tensor([0, 3, 1]), group_index=torch.tensor([0, 0, 1]))
    mean = s.mean
    assert mean.tolist() == pytest.approx([0.0, -1.0, -1.0])
    mean.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad.tolist() == pytest.approx([0.0, 1 / 3, 1.0])


@pytest.mark.parametrize("share_prefix", [True, False])
def test_score_groups_with_empty_candidates_stays_finite(share_prefix):
    from aftune.modeling import build_tiny_model, train_tokenizer

    tok = train_tokenizer(["Question: 1 + 2\nAnswer:\n3", "some more text 45"], vocab_size=280)
    model = build_tiny_model(tok, hidden_size=16, n_layers=1, n_heads=2)
    prompts = [tok("Question: 1 + 2")["input_ids"], tok("Answer:")["input_ids"]]
    cands = [[[], tok(" 3")["input_ids"]], [[]]]  # empty responses, one group with nothing else
    s = score_groups(model, prompts, cands, tok.pad_token_id, share_prefix=share_prefix)
    assert s.n_tokens.tolist()[0] == 0 and s.n_tokens.tolist()[2] == 0
    assert torch.isfinite(s.mean).all() and torch.isfinite(s.logp_sum).all()
    assert s.mean[0].item() == 0.0 and s.mean[2].item() == 0.0
    s.mean.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
