"""Real benchmarks through the same steps: multi-task evaluation with per-task metrics, and training on a mix."""

import json
import os
from pathlib import Path

import pytest
from conftest import cli

DATA = Path(os.environ.get("AFTUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
pytestmark = pytest.mark.skipif(not (DATA / "gsm8k").exists(), reason=f"benchmark data not found at {DATA}")


def test_eval_on_a_task_mix_reports_each_task(tiny_model, tmp_path):
    out = tmp_path / "ev.json"
    r = cli(
        "eval",
        "--model",
        tiny_model,
        "--task",
        "gsm8k,aqua,ecqa",
        "--data-dir",
        DATA,
        "--n-questions",
        "3",
        "--max-new-tokens",
        "8",
        "--out",
        out,
        "--quiet",
    )
    assert r.code == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["n"] == 9
    assert set(res["per_task"]) == {"gsm8k", "aqua", "ecqa"}
    assert all(v["n"] == 3 for v in res["per_task"].values())
    preds = [json.loads(x) for x in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert {p["task"] for p in preds} == {"gsm8k", "aqua", "ecqa"} and len(preds) == 9


def test_sft_on_a_task_mix(tiny_model, tmp_path):
    r = cli(
        "sft",
        "--model",
        tiny_model,
        "--task",
        "gsm8k,aqua",
        "--data-dir",
        DATA,
        "--n-train",
        "4",
        "--n-validation",
        "2",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-steps",
        "2",
        "--max-response-tokens",
        "32",
        "--no-eval-accuracy",
        "--quiet",
        "--out",
        tmp_path / "mix",
    )
    assert r.code == 0, r.stderr
    m = json.loads((tmp_path / "mix" / "metrics.json").read_text())
    assert m["n_train"] == 8 and m["steps"] == 2
