"""Regression corpora of tricky completions (tests/corpora/*.jsonl), run in strict and flexible mode.

Each line: `completion`, `gold` (normalised), `strict` / `flexible` (expected extracted answer or
null), `correct` (expected `Task.grade(...).correct`, which grades the flexible extraction), `note`; the
multiple-choice corpora add the example's `options`.  The expected values were written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aftune.records import Example
from aftune.tasks.aqua import AquaTask
from aftune.tasks.ecqa import ECQATask
from aftune.tasks.gsm8k import GSM8KTask

CORPORA = Path(__file__).parent / "corpora"
MIN_CASES = 60

# The tasks are built without data (grading needs none); data_dir=None would mean "the hub".
TASKS = {"gsm8k": GSM8KTask, "aqua": AquaTask, "ecqa": ECQATask}


def _task(name: str, tmp_path_factory: pytest.TempPathFactory):
    return TASKS[name](data_dir=str(tmp_path_factory.getbasetemp()))


def _cases(name: str) -> list[dict]:
    lines = (CORPORA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _params():
    for name in TASKS:
        for case in _cases(name):
            yield pytest.param(name, case, id=case["id"])


@pytest.mark.parametrize("name", list(TASKS))
def test_corpus_is_large_and_well_formed(name):
    cases = _cases(name)
    assert len(cases) >= MIN_CASES
    assert len({c["id"] for c in cases}) == len(cases)
    for c in cases:
        assert {"id", "note", "completion", "gold", "strict", "flexible", "correct"} <= set(c), c["id"]
        if name != "gsm8k":
            assert sorted(c["options"]) == ["A", "B", "C", "D", "E"], c["id"]
    # Both outcomes and both "no answer" situations are represented.
    assert any(c["correct"] for c in cases) and any(not c["correct"] for c in cases)
    assert any(c["flexible"] is None for c in cases)
    assert any(c["strict"] is None and c["flexible"] is not None for c in cases)


@pytest.mark.parametrize("name, case", list(_params()))
def test_corpus_case(name, case, tmp_path_factory):
    task = _task(name, tmp_path_factory)
    options = case.get("options")
    example = Example(id=case["id"], question="q", reference="", answer=case["gold"], options=options)
    assert task.extract_answer(case["completion"], example, strict=True) == case["strict"], case["note"]
    assert task.extract_answer(case["completion"], example) == case["flexible"], case["note"]
    assert task.grade(case["completion"], example).correct is case["correct"], case["note"]
    # Strict never finds an answer that flexible mode would not also find.
    if case["strict"] is not None:
        assert case["flexible"] == case["strict"], case["note"]
