"""--bf16 means one thing on every command, compute in bfloat16: training under bf16 autocast over fp32 weights
(AFTConfig.bf16), and the commands that only run the model (sample, eval, assess) with bf16 weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import aftune.commands.assess as assess_cmd
import aftune.commands.eval as eval_cmd
import aftune.modeling as modeling
from aftune import config as C
from aftune.commands.training import training_args

INFERENCE = (C.SampleConfig, C.EvalConfig, C.AssessConfig)


@pytest.mark.parametrize("cls", [*INFERENCE, C.SFTConfig, C.AlignConfig, C.GRPORunConfig, C.IterateConfig])
def test_every_command_gives_bf16_the_same_help(cls):
    assert {f.name: f for f in dataclasses.fields(cls)}["bf16"].metadata["help"] == C.BF16_HELP


def test_training_bf16_is_autocast_over_fp32_weights(tmp_path):
    args = training_args(C.AlignConfig(bf16=True, out=str(tmp_path)), tmp_path)
    assert args.bf16 is True  # Trainer's mixed precision: bf16 autocast, the weights stay as loaded (fp32)


@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_eval_and_assess_load_the_weights_in_bf16(bf16, dtype, tmp_path, monkeypatch):
    loaded = []
    real = modeling.load_for_inference

    def spy(name, dtype="float32", **kw):
        model, tok = real(name, dtype, **kw)
        loaded.append(next(model.parameters()).dtype)
        return model, tok

    monkeypatch.setattr(modeling, "load_for_inference", spy)  # what sampling.engines.open_engine calls
    monkeypatch.setattr(assess_cmd, "load_for_inference", spy)
    common = dict(model="arith-base", bf16=bf16, backend="hf", quiet=True, task_args="n_test=2,n_validation=2")
    eval_cmd.run_eval(C.EvalConfig(**common, n_questions=2, max_new_tokens=8, out=str(tmp_path / "e.json")))
    assess_cmd.run_assess(
        C.AssessConfig(**common, n_questions=2, k=2, max_new_tokens=8, split="validation", out=str(tmp_path / "a"))
    )
    assert loaded == [dtype, dtype], loaded
