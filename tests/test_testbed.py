"""The testbed's shipped pretrained base (`--model arith-base`): present, intact, what its recipe says, and
actually pretrained (it solves the short problems it saw, not the long ones the testbed asks)."""

import hashlib
import re
from pathlib import Path

import pytest
import torch
import yaml

from aftune.commands.demo import FULL, QUICK, TESTBED_TASK
from aftune.evaluation.accuracy import greedy_accuracy
from aftune.io import InputError
from aftune.modeling import ASSETS, BUILTIN_MODELS, load_model_and_tokenizer, resolve_model
from aftune.tasks.arith import ArithTask

ROOT = Path(__file__).resolve().parents[1]
BASE = ASSETS / "arith-base"


def test_base_ships_intact_with_its_card():
    card = (BASE / "README.md").read_text()
    sha = re.search(r"sha256: `([0-9a-f]{64})`", card).group(1)
    assert hashlib.sha256((BASE / "model.safetensors").read_bytes()).hexdigest() == sha
    assert not list(BASE.glob("*.bin")) and not list(BASE.glob("*.pt"))  # safetensors only, no pickles
    assert resolve_model("arith-base") == str(BASE) and "arith-base" in BUILTIN_MODELS


def test_shipped_recipe_is_the_config_in_the_repo():
    recipe = yaml.safe_load((BASE / "recipe.yaml").read_text())
    config = yaml.safe_load((ROOT / "configs" / "testbed" / "arith-base.yaml").read_text())
    for key, value in config.items():
        if key != "out":  # where it was built
            assert recipe[key] == value, key


@pytest.fixture(scope="module")
def base():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model_and_tokenizer("arith-base")
    finally:
        torch.set_num_threads(threads)


def test_base_solves_short_problems_and_not_yet_the_testbed(base):
    model, tok = base
    short = ArithTask(
        seed=77, n_train=1, n_validation=1, n_test=40, min_steps=1, max_steps=2, max_value=200, max_number=20
    )
    knobs = {k: int(v) for k, v in (kv.split("=") for kv in TESTBED_TASK.split(","))}
    long = ArithTask(seed=77, n_train=1, n_validation=1, n_test=40, **knobs)
    acc_short = greedy_accuracy(model, tok, [(short, e) for e in short.load("test")], max_new_tokens=64)["accuracy"]
    acc_long = greedy_accuracy(model, tok, [(long, e) for e in long.load("test")], max_new_tokens=128)["accuracy"]
    assert acc_short >= 0.6  # measured 0.83 on 200 such problems
    assert acc_long < acc_short - 0.3  # the 3-4-step problems are what VFT must teach


def test_plans_start_from_the_base_and_a_missing_asset_is_a_clear_error(monkeypatch, tmp_path):
    assert FULL.base == QUICK.base == "arith-base"
    monkeypatch.setattr("aftune.modeling.ASSETS", tmp_path)
    with pytest.raises(InputError, match="built-in model missing"):
        load_model_and_tokenizer("arith-base")
