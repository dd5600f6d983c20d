"""gsm8k / aqua / ecqa: loading, references that grade as correct, prompts, input errors, hub path.

Real data: env AFTUNE_DATA, else `<repo root>/../shared/data`; tests that need it skip without it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aftune.io import InputError
from aftune.records import Example
from aftune.tasks import get_task
from aftune.tasks.aqua import AquaTask, build_reference, closing_letter
from aftune.tasks.choices import extract_choice
from aftune.tasks.ecqa import ECQATask
from aftune.tasks.gsm8k import GSM8KTask

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AFTUNE_DATA") or REPO.parent / "shared" / "data")
needs_data = pytest.mark.skipif(
    not (DATA / "gsm8k" / "train.jsonl").exists(), reason=f"benchmark data not found at {DATA} (set AFTUNE_DATA)"
)

EXPECTED_SIZES = {
    "gsm8k": {"train": 6973, "validation": 500, "test": 1319},
    "aqua": {"train": 2728, "validation": 254, "test": 254},
    "ecqa": {"train": 7112, "validation": 1090, "test": 2194},
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, dict[str, list[Example]]]:
    if not (DATA / "gsm8k" / "train.jsonl").exists():
        pytest.skip(f"benchmark data not found at {DATA} (set AFTUNE_DATA)")
    return {
        name: {split: get_task(name, data_dir=str(DATA)).load(split) for split in splits}
        for name, splits in EXPECTED_SIZES.items()
    }


# ---------------------------------------------------------------- real data


@needs_data
@pytest.mark.parametrize("name", list(EXPECTED_SIZES))
def test_split_sizes_and_unique_ids(loaded, name):
    for split, n in EXPECTED_SIZES[name].items():
        examples = loaded[name][split]
        assert len(examples) == n, split
        assert len({e.id for e in examples}) == n, split


@needs_data
@pytest.mark.parametrize("name", list(EXPECTED_SIZES))
def test_every_reference_grades_as_correct(loaded, name):
    task = get_task(name, data_dir=str(DATA))
    for split, examples in loaded[name].items():
        for e in examples:
            assert task.grade(e.reference, e).correct, (split, e.id)
            assert task.answers_match(task.extract_answer(e.reference, e, strict=True), e.answer), (split, e.id)


@needs_data
@pytest.mark.parametrize("name", list(EXPECTED_SIZES))
def test_reference_with_a_wrong_final_answer_grades_as_wrong(loaded, name):
    # The counterpart of the test above: grading really reads the final answer line.
    task = get_task(name, data_dir=str(DATA))
    for split, examples in loaded[name].items():
        for e in examples:
            body, _, last = e.reference.rpartition("\n")
            if name == "gsm8k":
                wrong = f"{body}\n#### {int(e.answer) + 1}"
            else:
                other = "B" if e.answer == "A" else "A"
                assert last == f"The answer is {e.answer}."
                wrong = f"{body}\nThe answer is {other}."
            assert not task.grade(wrong, e).correct, (split, e.id)


@needs_data
def test_gsm8k_answers_and_validation_slice(loaded):
    g = loaded["gsm8k"]
    assert all(e.reference.rsplit("\n", 1)[1].startswith("#### ") for s in g.values() for e in s)
    raw = [json.loads(line) for line in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    # validation = the last 500 records of train.jsonl, in order; train = the rest.
    assert [e.question for e in g["validation"]] == [r["question"] for r in raw[-500:]]
    assert [e.question for e in g["train"]] == [r["question"] for r in raw[:-500]]
    assert not {e.id for e in g["train"]} & {e.id for e in g["validation"]}
    everything = [e for s in g.values() for e in s]
    commas = [e for e in everything if "#### " in e.reference and "," in e.reference.rsplit("#### ", 1)[1]]
    assert len(commas) == 93 and all("," not in e.answer and e.answer.isdigit() for e in commas)
    assert sum(e.answer.startswith("-") for e in everything) == 5
    first = g["train"][0]
    assert first.id == "gsm8k-train-0" and first.answer == "72" and first.reference == raw[0]["answer"]


@needs_data
def test_aqua_references_and_options(loaded):
    a = loaded["aqua"]
    dev0 = a["validation"][0]
    assert dev0.options == {"A": "32400", "B": "6000", "C": "600", "D": "60000", "E": "10"}
    # "Correct answer - A" closing line replaced by the uniform answer line.
    assert dev0.reference.endswith("Speed in miles/minutes = 60 * 540 = 32400\nThe answer is A.")
    flan0 = a["train"][0]
    assert flan0.options["C"] == "1120" and flan0.answer == "C"
    assert flan0.reference == "1/7:1/7:1/14 = 2:2:1\n1/5*5600 = 1120\n2240-1120 = 1120\nThe answer is C."
    task = AquaTask(data_dir=str(DATA))
    task.load("validation")
    dropped = task.dropped_closing_lines
    task.load("test")
    assert dropped + task.dropped_closing_lines == 455  # of 508; the rest are kept (see docs/tasks.md)
    task.load("train")
    assert task.dropped_closing_lines == 0  # FLAN rationales have no closing line


@needs_data
def test_ecqa_references(loaded, caplog):
    e = loaded["ecqa"]
    assert all(x.meta["has_cot"] for x in e["train"])
    assert e["train"][0].reference == (
        "Bloody mess is covered or stained with blood. A person might see a bloody "
        "mess at the scene of a brutal killing.\nThe answer is A."
    )
    for split, with_cot in (("validation", 7), ("test", 32)):
        assert sum(x.meta["has_cot"] for x in e[split]) == with_cot
        assert all(x.reference == f"The answer is {x.answer}." for x in e[split] if not x.meta["has_cot"])
    task = ECQATask(data_dir=str(DATA))
    with caplog.at_level(logging.INFO, logger="aftune.tasks.ecqa"):
        task.load("train")
    assert task.skipped_without_cot == 486
    assert "skipped 486 of 7598" in caplog.text


@needs_data
def test_prompts_zero_and_few_shot(loaded):
    g = GSM8KTask(data_dir=str(DATA))
    ex = loaded["gsm8k"]["test"][0]
    assert g.prompt(ex) == f"Question: {ex.question}\nAnswer:\n"
    a = AquaTask(data_dir=str(DATA))
    dev0 = loaded["aqua"]["validation"][0]
    assert a.prompt(dev0) == (f"Question: {dev0.question}\nOptions: A) 32400 B) 6000 C) 600 D) 60000 E) 10\nAnswer:\n")
    g2 = GSM8KTask(data_dir=str(DATA), n_shot=2)
    t0, t1, t2 = loaded["gsm8k"]["train"][:3]
    shots = f"Question: {t0.question}\nAnswer:\n{t0.reference}\n\nQuestion: {t1.question}\nAnswer:\n{t1.reference}\n\n"
    assert g2.prompt(ex) == shots + g.prompt(ex)
    assert g2.prompt(ex) == GSM8KTask(data_dir=str(DATA), n_shot=2).prompt(ex)  # deterministic
    # An exemplar is never the prompted example itself.
    assert g2.prompt(t0).count(t0.question) == 1 and t2.question in g2.prompt(t0)
    e2 = ECQATask(data_dir=str(DATA), n_shot=1)
    tr0 = loaded["ecqa"]["train"][0]
    val0 = loaded["ecqa"]["validation"][0]
    assert e2.prompt(val0).startswith(e2.zero_shot_prompt(tr0) + tr0.reference + "\n\nQuestion: ")
    with pytest.raises(ValueError):
        GSM8KTask(data_dir=str(DATA), n_shot=-1)


@needs_data
def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        AquaTask(data_dir=str(DATA)).load("dev")


# ---------------------------------------------------------------- grading details


def test_numeric_answers_match_numerically(tmp_path):
    g = GSM8KTask(data_dir=str(tmp_path))
    assert g.answers_match("29.00", "29") and g.answers_match("1,600", "1600") and g.answers_match("$29", "29")
    assert not g.answers_match("29.5", "29") and not g.answers_match(None, "29")
    assert g.grade("so $1,600.00 in total", Example("x", "q", "", "1600")).correct


def test_letter_answers_match(tmp_path):
    a = AquaTask(data_dir=str(tmp_path))
    assert a.answers_match("c", "C") and a.answers_match("(C)", "C")
    assert not a.answers_match("CD", "C") and not a.answers_match(None, "C")
    # Without options only letters are recognised; with them, option text too.
    assert extract_choice("The answer is 600.") is None
    assert (
        extract_choice("The answer is 600.", options={"A": "6", "B": "60", "C": "600", "D": "6000", "E": "0"}) == "C"
    )


def test_closing_line_detection():
    opts = {"A": "21", "B": "20%", "C": "0.4", "D": "8000", "E": "10"}
    for line, want in [
        ("ANSWER:B", "B"),
        ("Answer is A.", "A"),
        ("Correct answer - A", "A"),
        ("The answer is option B) 20%.", "B"),
        ("Hence (C) is the correct answer", "C"),
        ("Answer: C) 0.4", "C"),
        ("E", "E"),
        ("CORRECT OPTION:OPTION E", "E"),
        ("Total time = 2 + 2 = 4 Answer D", None),
        ("Answer: D) 109 rolls", None),
        ("x= 20.0", None),
        ("A car travels 10 km", None),
    ]:
        assert closing_letter(line, opts) == want, line
    ref, dropped = build_reference("x = 20\nAnswer: E", "E", opts)
    assert (ref, dropped) == ("x = 20\nThe answer is E.", True)
    # A closing line naming another letter than the label is kept; the label's line comes last.
    ref, dropped = build_reference("x = 20\nAnswer: D", "E", opts)
    assert (ref, dropped) == ("x = 20\nAnswer: D\nThe answer is E.", False)
    assert build_reference("Answer: E", "E", opts) == ("Answer: E\nThe answer is E.", False)


# ---------------------------------------------------------------- malformed input


def _write(root: Path, rel: str, records: list) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD_GSM = {"question": "q", "answer": "1 + 1 = 2\n#### 2"}
GOOD_AQUA = {"question": "q", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"], "rationale": "1+1=2", "correct": "B"}
GOOD_ECQA = {
    "id": "x1",
    "question": "q",
    "choices": [{"label": L, "text": t} for L, t in zip("ABCDE", "vwxyz")],
    "answerKey": "A",
    "cot_positives_flan": None,
}


@pytest.mark.parametrize(
    "task_cls, rel, split, bad, field",
    [
        (GSM8KTask, "gsm8k/test.jsonl", "test", {"question": "q"}, "answer"),
        (GSM8KTask, "gsm8k/test.jsonl", "test", {"question": 3, "answer": "#### 2"}, "question"),
        (GSM8KTask, "gsm8k/test.jsonl", "test", {"question": "q", "answer": "it is 2"}, "answer"),
        (GSM8KTask, "gsm8k/test.jsonl", "test", {"question": "q", "answer": "x\n#### two"}, "answer"),
        (AquaTask, "aqua/test.jsonl", "test", {**GOOD_AQUA, "correct": "F"}, "correct"),
        (AquaTask, "aqua/test.jsonl", "test", {**GOOD_AQUA, "options": ["A)1", "B)2"]}, "options"),
        (
            AquaTask,
            "aqua/test.jsonl",
            "test",
            {**GOOD_AQUA, "options": ["A)1", "C)2", "B)3", "D)4", "E)5"]},
            "options",
        ),
        (
            AquaTask,
            "aqua/dev.jsonl",
            "validation",
            {k: v for k, v in GOOD_AQUA.items() if k != "rationale"},
            "rationale",
        ),
        (AquaTask, "aqua/flan_cot/aqua_train_flan.jsonl", "train", {**GOOD_AQUA, "options": "A)1"}, "options"),
        (ECQATask, "ecqa/ecqa_val.jsonl", "validation", {**GOOD_ECQA, "answerKey": "Z"}, "answerKey"),
        (ECQATask, "ecqa/ecqa_val.jsonl", "validation", {**GOOD_ECQA, "choices": GOOD_ECQA["choices"][:4]}, "choices"),
        (ECQATask, "ecqa/ecqa_test.jsonl", "test", {**GOOD_ECQA, "cot_positives_flan": 5}, "cot_positives_flan"),
        (ECQATask, "ecqa/ecqa_train.jsonl", "train", {k: v for k, v in GOOD_ECQA.items() if k != "id"}, "id"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, task_cls, rel, split, bad, field):
    good = {GSM8KTask: GOOD_GSM, AquaTask: GOOD_AQUA, ECQATask: GOOD_ECQA}[task_cls]
    path = _write(tmp_path, rel, [good, bad])
    with pytest.raises(InputError) as err:
        task_cls(data_dir=str(tmp_path)).load(split)
    assert (str(err.value.path), err.value.line, err.value.field) == (str(path), 2, field)
    assert str(path) in str(err.value) and "line 2" in str(err.value)


def test_bad_json_and_missing_files(tmp_path):
    _write(tmp_path, "gsm8k/test.jsonl", [GOOD_GSM, "{not json"])
    with pytest.raises(InputError, match="line 2"):
        GSM8KTask(data_dir=str(tmp_path)).load("test")
    with pytest.raises(InputError, match="does not exist"):
        AquaTask(data_dir=str(tmp_path)).load("test")
    with pytest.raises(InputError, match="data directory does not exist"):
        GSM8KTask(data_dir=str(tmp_path / "nope"))


def test_small_local_tree(tmp_path):
    records = [{"question": f"q{i}", "answer": f"x\n#### {i:,}"} for i in range(1000, 1600)]
    _write(tmp_path, "gsm8k/train.jsonl", records)
    g = GSM8KTask(data_dir=str(tmp_path))
    tr, va = g.load("train"), g.load("validation")
    assert len(tr) == 100 and len(va) == 500 and tr[-1].answer == "1099" and va[0].answer == "1100"
    cot = {**GOOD_ECQA, "id": "y", "cot_positives_flan": "Because v."}
    _write(tmp_path, "ecqa/ecqa_train.jsonl", [GOOD_ECQA, cot])
    e = ECQATask(data_dir=str(tmp_path))
    assert [x.id for x in e.load("train")] == ["ecqa-train-y"] and e.skipped_without_cot == 1


# ---------------------------------------------------------------- hub path


@pytest.fixture
def fake_hub(monkeypatch):
    calls: list[tuple] = []
    rows = {
        "openai/gsm8k": [{"question": f"q{i}", "answer": f"step\n#### {i}"} for i in range(600)],
        "deepmind/aqua_rat": [{**GOOD_AQUA, "rationale": "1+1=2\nAnswer: B"}],
        "tau/commonsense_qa": [
            {
                "id": "c1",
                "question": "q",
                "question_concept": "x",
                "choices": {"label": list("ABCDE"), "text": list("vwxyz")},
                "answerKey": "C",
            }
        ],
    }

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return rows[path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("AFTUNE_DATA", raising=False)
    return calls


def test_hub_loading(fake_hub):
    g = get_task("gsm8k")
    assert g.data_dir is None
    assert len(g.load("train")) == 100 and len(g.load("validation")) == 500 and g.load("test")[3].answer == "3"
    a = get_task("aqua")
    (ex,) = a.load("train")
    assert ex.reference == "1+1=2\nThe answer is B." and ex.options["E"] == "5"
    e = get_task("ecqa")
    (ex,) = e.load("validation")
    assert ex.reference == "The answer is C." and ex.options["C"] == "x"
    assert e.grade("It must be x.", ex).correct
    assert fake_hub == [
        ("openai/gsm8k", "main", "train"),
        ("openai/gsm8k", "main", "train"),
        ("openai/gsm8k", "main", "test"),
        ("deepmind/aqua_rat", "raw", "train"),
        ("tau/commonsense_qa", None, "validation"),
    ]


def test_hub_ecqa_train_and_test_raise(fake_hub):
    e = ECQATask()
    with pytest.raises(InputError, match="chains of thought"):
        e.load("train")
    with pytest.raises(InputError, match="no public labels"):
        e.load("test")
    assert fake_hub == []


def test_hub_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    monkeypatch.delenv("AFTUNE_DATA", raising=False)
    with pytest.raises(ImportError, match="aftune\\[hub\\]"):
        GSM8KTask().load("test")


def test_env_var_selects_local_data(tmp_path, monkeypatch):
    _write(tmp_path, "gsm8k/test.jsonl", [GOOD_GSM])
    monkeypatch.setenv("AFTUNE_DATA", str(tmp_path))
    assert [e.answer for e in GSM8KTask().load("test")] == ["2"]


# ---------------------------------------------------------------- robustness

_OPTS = {"A": "bloody mess", "B": "6000", "C": "a", "D": "feeling of guilt", "E": "10%"}
_PIECES = list("ABCDEabce()*:.,- \n1060%") + ["answer", "The answer is ", "option", "####", "bloody mess", "guilt"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=60).map("".join) | st.text(max_size=300))
def test_choice_extraction_is_total_and_consistent(text):
    t = time.thread_time()
    strict = extract_choice(text, strict=True, options=_OPTS)
    flexible = extract_choice(text, options=_OPTS)
    assert strict is None or strict in "ABCDE"
    assert flexible is None or flexible in "ABCDE"
    assert strict is None or flexible == strict
    assert time.thread_time() - t < 1.0
