"""One grading path: `aftune sample` (labels) and `aftune eval` (accuracy) must agree on every completion.

Regression: eval used to grade AQuA / ECQA completions without the option texts while sampling used them,
so `So the answer is 0.26.` (0.26 being option B) was a correct candidate and a wrong prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aftune.evaluation import accuracy
from aftune.records import Example
from aftune.sampling.sampler import Sample
from aftune.sampling.store import build_group
from aftune.tasks import Task, get_task, get_tasks, register_task
from aftune.tasks.aqua import AquaTask
from aftune.tasks.ecqa import ECQATask
from aftune.tasks.gsm8k import GSM8KTask

CORPORA = Path(__file__).parent / "corpora"
TASKS = {"gsm8k": GSM8KTask, "aqua": AquaTask, "ecqa": ECQATask}
AQUA_OPTIONS = {"A": "0.24", "B": "0.26", "C": "0.28", "D": "0.30", "E": "0.32"}


def _cases():
    for name in TASKS:
        for line in (CORPORA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                case = json.loads(line)
                yield pytest.param(name, case, id=case["id"])


def _both_paths(task: Task, example: Example, text: str, monkeypatch) -> tuple[tuple, tuple]:
    """(answer, correct) as `aftune sample` labels the completion, and as `aftune eval` grades it (the real
    greedy_predictions, with the model's generation replaced by the completion)."""
    sample = Sample(text=text, token_ids=[1], logprob_sum=-1.0, n_tokens=1)
    cand = build_group(task, example, task.prompt(example), [sample], k=1).candidates[0]
    seen_stop = []

    def fake_generate(model, tokenizer, prompts, cfg, progress=False):
        seen_stop.append(cfg.stop)
        return [[sample] for _ in prompts]

    monkeypatch.setattr(accuracy, "generate_k", fake_generate)
    (row,) = accuracy.greedy_predictions(None, None, [(task, example)])
    assert seen_stop == [task.stop]  # eval cuts where the task says, as sampling does
    return (cand.answer, cand.correct), (row["prediction"], row["correct"])


@pytest.mark.parametrize("name, case", list(_cases()))
def test_eval_and_sample_grade_every_corpus_case_alike(name, case, tmp_path, monkeypatch):
    task = TASKS[name](data_dir=str(tmp_path))
    example = Example(id=case["id"], question="q", reference="", answer=case["gold"], options=case.get("options"))
    sampled, evaluated = _both_paths(task, example, case["completion"], monkeypatch)
    assert sampled == evaluated, case["note"]
    assert evaluated[1] is case["correct"], case["note"]


@pytest.mark.parametrize("cls", [AquaTask, ECQATask])
def test_answer_given_by_option_text_is_correct_in_eval_too(cls, tmp_path, monkeypatch):
    task = cls(data_dir=str(tmp_path))
    example = Example(id="x", question="q", reference="", answer="B", options=AQUA_OPTIONS)
    sampled, evaluated = _both_paths(task, example, "Let us think. So the answer is 0.26.", monkeypatch)
    assert sampled == evaluated == ("B", True)
    # and a wrong option text is wrong on both paths
    sampled, evaluated = _both_paths(task, example, "Let us think. So the answer is 0.28.", monkeypatch)
    assert sampled == evaluated == ("C", False)


def test_greedy_predictions_keep_item_order_across_tasks(monkeypatch):
    a, g = get_task("arith", n_train=4, n_validation=2, n_test=3), GSM8KTask(data_dir=".")
    exs = a.load("test")
    items = [(a, exs[0]), (g, Example("g1", "q", "", "7")), (a, exs[1])]

    def fake_generate(model, tokenizer, prompts, cfg, progress=False):
        return [[Sample(text="#### 7", token_ids=[1], logprob_sum=0.0, n_tokens=1)] for _ in prompts]

    monkeypatch.setattr(accuracy, "generate_k", fake_generate)
    rows = accuracy.greedy_predictions(None, None, items)
    assert [r["id"] for r in rows] == [exs[0].id, "g1", exs[1].id]
    assert [r["task"] for r in rows] == ["arith", "gsm8k", "arith"]
    assert rows[1]["correct"] and rows[1]["prediction"] == "7"


class _LastWordTask(Task):
    name = "lastword"

    def __init__(self, words: int = 3):
        self.words = words

    def load(self, split):
        self.check_split(split)
        return [Example(f"{split}-{i}", f"say w{i}", f"w{i}", f"w{i}") for i in range(self.words)]

    def extract_answer(self, completion, example=None, strict=False):
        parts = completion.split()
        return parts[-1] if parts else None


def test_register_task_makes_a_task_usable_by_name():
    register_task("lastword", f"{__name__}:_LastWordTask")
    try:
        (task,) = get_tasks("lastword", {"words": 2})
        assert isinstance(task, _LastWordTask) and len(task.load("train")) == 2
        ex = task.load("test")[1]
        assert task.grade("it is w1", ex).correct and not task.grade("it is w0", ex).correct
        with pytest.raises(ValueError, match="unknown split"):
            task.load("dev")
        with pytest.raises(ValueError, match="no option"):
            get_tasks("lastword", {"colour": 1})
    finally:
        from aftune import tasks

        tasks._REGISTRY.pop("lastword")
    with pytest.raises(ValueError, match="unknown task 'lastword'"):
        get_task("lastword")
