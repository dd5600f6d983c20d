"""Task files (`--task path/to/task.yaml`, aftune.tasks.file_task, docs/task-files.md).

- configs/tasks/gsm8k.yaml is the built-in gsm8k task re-expressed: same examples and same grades, on the
  extraction corpus and (when ../shared/data or $AFTUNE_DATA exists) on every real record;
- configs/tasks/math_tiny.yaml and its hand-written data load and grade their own references correct;
- every answer type, every `answer_from`, the template rules and each bad-file error (exact messages);
- the documented example run (sft -> sample -> align -> eval through the task file) and `aftune tasks`.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import cli

from aftune.io import InputError
from aftune.records import Example
from aftune.tasks import Graded, describe_tasks, format_task_list, get_task, get_tasks
from aftune.tasks.file_task import FileTask
from aftune.tasks.gsm8k import GSM8KTask

REPO = Path(__file__).resolve().parents[1]
GSM8K_YAML = REPO / "configs" / "tasks" / "gsm8k.yaml"
MATH_YAML = REPO / "configs" / "tasks" / "math_tiny.yaml"
CORPUS = REPO / "tests" / "corpora" / "gsm8k.jsonl"
SHARED = Path(os.environ.get("AFTUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def write_task(tmp_path: Path, body: str, rows: dict[str, list[dict]] | None = None, name: str = "task.yaml") -> Path:
    """A task file in tmp_path (and its JSONL data, one file per split) -> the task file's path."""
    for split, records in (rows or {}).items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip("\n"), encoding="utf-8")
    return path


def error_of(path: Path, **kwargs) -> str:
    """The one-line message of the InputError that building (and loading) the task raises."""
    with pytest.raises(InputError) as e:
        task = FileTask(path, **kwargs)
        for split in task.splits:
            task.load(split)
    msg = str(e.value)
    assert "\n" not in msg
    return msg.replace(str(path.parent) + os.sep, "")


QA_ROWS = [
    {"q": "Capital of France?", "sol": "Paris is the capital.\n#### Paris"},
    {"q": "Capital of Italy?", "sol": "It is Rome.\n#### Rome"},
    {"q": "Largest US city?", "sol": "By population:\n#### New   York"},
]
EXACT = """
    name: capitals
    data: {train: train.jsonl, test: train.jsonl}
    fields: {question: q, solution: sol}
    answer_type: exact
    """


# ------------------------------------------------------------------ gsm8k.yaml == the built-in gsm8k


def _cases() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gsm8k_pair(tmp_path_factory):
    """(built-in, task-file) gsm8k, built on an empty data dir: grading needs no data."""
    empty = tmp_path_factory.mktemp("empty")
    return GSM8KTask(data_dir=str(empty)), get_task(str(GSM8K_YAML), data_dir=str(empty))


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["id"])
def test_gsm8k_file_grades_like_builtin_on_corpus(case, gsm8k_pair):
    builtin, file_task = gsm8k_pair
    ex = Example(id=case["id"], question="q", reference="", answer=case["gold"])
    for strict in (True, False):
        assert (
            file_task.extract_answer(case["completion"], ex, strict=strict)
            == builtin.extract_answer(case["completion"], ex, strict=strict)
            == case["strict" if strict else "flexible"]
        ), case["note"]
    assert file_task.grade(case["completion"], ex) == builtin.grade(case["completion"], ex)
    assert file_task.grade(case["completion"], ex).correct is case["correct"], case["note"]


def test_gsm8k_file_spec_mirrors_builtin(gsm8k_pair):
    builtin, file_task = gsm8k_pair
    assert (file_task.name, file_task.splits, file_task.stop) == (builtin.name, builtin.splits, builtin.stop)
    assert file_task.spec.validation_from_train == 500


@pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").exists(), reason="no local GSM8K data")
def test_gsm8k_file_same_examples_and_grades_on_real_data():
    builtin = GSM8KTask(data_dir=str(SHARED))
    file_task = get_task(str(GSM8K_YAML), data_dir=str(SHARED))
    for split in ("train", "validation", "test"):
        a, b = builtin.load(split), file_task.load(split)
        assert len(a) == len(b) > 0, split
        assert [(e.id, builtin.prompt(e), e.reference, e.answer, e.options, e.meta) for e in a] == [
            (e.id, file_task.prompt(e), e.reference, e.answer, e.options, e.meta) for e in b
        ], split
        for ea, eb in zip(a, b):
            for strict in (True, False):
                assert builtin.grade(ea.reference, ea, strict) == file_task.grade(eb.reference, eb, strict)
            # a wrong final number must be wrong for both
            wrong = ea.reference.rsplit("#### ", 1)[0] + f"#### {int(ea.answer) + 1}"
            assert builtin.grade(wrong, ea) == file_task.grade(wrong, eb) == Graded(str(int(ea.answer) + 1), False)
    # few-shot prompts are the built-in's too
    b3, f3 = GSM8KTask(data_dir=str(SHARED), n_shot=3), get_task(str(GSM8K_YAML), data_dir=str(SHARED), n_shot=3)
    for ea, eb in zip(b3.load("test")[:5], f3.load("test")[:5]):
        assert b3.prompt(ea) == f3.prompt(eb)


def test_gsm8k_file_data_source_order(tmp_path, monkeypatch):
    """data_dir, else AFTUNE_DATA, else the hub section: the built-in tasks' order."""
    monkeypatch.delenv("AFTUNE_DATA", raising=False)
    assert get_task(str(GSM8K_YAML)).use_hub
    monkeypatch.setenv("AFTUNE_DATA", str(tmp_path))
    task = get_task(str(GSM8K_YAML))
    assert not task.use_hub and task.data_file("test") == tmp_path / "gsm8k" / "test.jsonl"
    assert error_of(GSM8K_YAML).endswith(f"{tmp_path}/gsm8k/train.jsonl: file does not exist")
    monkeypatch.delenv("AFTUNE_DATA")
    no_hub = write_task(
        tmp_path,
        """
        name: local_only
        data: {test: "${AFTUNE_DATA}/x/test.jsonl"}
        fields: {question: q, solution: sol}
        answer_type: number
        """,
    )
    assert error_of(no_hub) == (
        "task.yaml: line 2: field 'data.test': uses ${AFTUNE_DATA}, but neither "
        "--data-dir (data_dir) nor the AFTUNE_DATA environment variable is set"
    )


def test_gsm8k_file_hub_path(monkeypatch):
    """Without local data the hub section is used: the same parsing and validation slice as local rows."""
    import types

    import aftune.tasks.file_task as ft

    calls = []

    def load_dataset(path, name, split, revision):
        calls.append((path, name, split, revision))
        n = 503 if split == "train" else 2
        return [{"question": f"{split} q{i}", "answer": f"work\n#### {i}"} for i in range(n)]

    monkeypatch.delenv("AFTUNE_DATA", raising=False)
    monkeypatch.setattr(ft, "import_datasets", lambda: types.SimpleNamespace(load_dataset=load_dataset))
    task = get_task(str(GSM8K_YAML))
    train, val, test = task.load("train"), task.load("validation"), task.load("test")
    assert (len(train), len(val), len(test)) == (3, 500, 2)
    assert val[0].id == "gsm8k-train-3" and test[1].answer == "1" and train[2].question == "train q2"
    assert calls == [("openai/gsm8k", "main", "train", None), ("openai/gsm8k", "main", "test", None)]  # cached


def test_mixing_two_tasks_of_one_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match=f"'gsm8k' and '{GSM8K_YAML}' are both task 'gsm8k'; mix distinct tasks"):
        get_tasks(f"gsm8k,{GSM8K_YAML}", data_dir=str(tmp_path))


# ------------------------------------------------------------------ math_tiny


def test_math_tiny_loads_and_every_reference_grades_correct():
    task = get_task(str(MATH_YAML))
    splits = {s: task.load(s) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 60, "validation": 12, "test": 20}
    questions = [e.question for v in splits.values() for e in v]
    assert len(set(questions)) == len(questions)  # no question in two splits
    for ex in (e for v in splits.values() for e in v):
        assert ex.reference.rstrip().endswith(f"\\boxed{{{ex.answer}}}$.")
        assert task.grade(ex.reference, ex, strict=True) == Graded(ex.answer, True)
    ex = splits["test"][0]
    assert task.prompt(ex) == f"Problem: {ex.question}\nSolution:\n" and task.stop == ("\nProblem:",)


# ------------------------------------------------------------------ answer types


def test_answer_type_number_with_field_and_custom_marker(tmp_path):
    path = write_task(
        tmp_path,
        """
        name: nums
        data: {train: train.jsonl}
        fields: {question: q, solution: sol, answer: gold}
        answer_marker: "Result:"
        answer_type: number
        """,
        {
            "train": [
                {"q": "1+1?", "sol": "1+1=2\nResult: 2", "gold": 2},
                {"q": "Half of 3?", "sol": "3/2\nResult: 1.5", "gold": "1.50"},
                {"q": "Money?", "sol": "Result: $1,600", "gold": "$1,600.00"},
            ]
        },
    )
    task = get_task(str(path))
    exs = task.load("train")
    assert [e.answer for e in exs] == ["2", "1.5", "1600"]
    assert task.spec.answer_from == "field"  # the default when fields.answer is set
    assert task.grade("so Result: 2 and 3 more", exs[0]) == Graded("2", True)  # the file's marker counts
    assert task.grade("Result: 3 then 2", exs[0], strict=True) == Graded("3", False)
    assert task.grade("#### 1,600.00 dollars", exs[2]) == Graded("1600", True)
    assert task.grade("no number", exs[1]) == Graded(None, False)


def test_answer_type_choice_option_shapes_and_grading(tmp_path):
    rows = [
        {"q": "Color of the sky?", "opts": ["green", "blue", "red"], "why": "Rayleigh scattering.", "key": "B"},
        {"q": "2+2?", "opts": ["A) 3", "B) 4", "C) 5"], "why": "Count.", "key": "b"},
        {"q": "Pet?", "opts": {"A": "cat", "B": "rock"}, "why": "Alive.", "key": "(A)"},
        {"q": "Hub shape?", "opts": {"label": ["A", "B"], "text": ["yes", "no"]}, "why": "Hm.", "key": "B"},
        {
            "q": "Pairs?",
            "opts": [{"label": "A", "text": "one"}, {"label": "B", "text": "two"}],
            "why": "2",
            "key": "B",
        },
    ]
    path = write_task(
        tmp_path,
        """
        name: mc
        data: {train: train.jsonl}
        fields: {question: q, solution: why, answer: key, options: opts}
        reference: "{solution}\\nThe answer is {answer}."
        answer_type: choice
        """,
        {"train": rows},
    )
    task = get_task(str(path))
    exs = task.load("train")
    assert [e.options for e in exs] == [
        {"A": "green", "B": "blue", "C": "red"},
        {"A": "3", "B": "4", "C": "5"},
        {"A": "cat", "B": "rock"},
        {"A": "yes", "B": "no"},
        {"A": "one", "B": "two"},
    ]
    assert [e.answer for e in exs] == ["B", "B", "A", "B", "B"]
    assert exs[0].reference == "Rayleigh scattering.\nThe answer is B."
    assert task.prompt(exs[0]) == "Question: Color of the sky?\nOptions: A) green B) blue C) red\nAnswer:\n"
    assert task.grade(exs[0].reference, exs[0], strict=True) == Graded("B", True)
    assert task.grade("It must be blue.", exs[0]) == Graded("B", True)  # by option text, through Example.options
    assert task.grade("The answer is (C).", exs[0]) == Graded("C", False)
    # one column per option
    cols = write_task(
        tmp_path,
        """
        name: mc_cols
        data: {train: cols.jsonl}
        fields: {question: q, solution: why, answer: key, options: [a, b, c, d]}
        answer_type: choice
        """,
        name="cols.yaml",
    )
    (tmp_path / "cols.jsonl").write_text(
        json.dumps({"q": "x?", "why": "y #### C", "key": "C", "a": 1, "b": 2, "c": 3, "d": 4}) + "\n"
    )
    ex = get_task(str(cols)).load("train")[0]
    assert ex.options == {"A": "1", "B": "2", "C": "3", "D": "4"} and ex.answer == "C"


def test_answer_type_choice_bad_gold(tmp_path):
    path = write_task(
        tmp_path,
        """
        name: mc
        data: {train: train.jsonl}
        fields: {question: q, solution: why, answer: key, options: opts}
        answer_type: choice
        """,
        {"train": [{"q": "x?", "opts": ["a", "b"], "why": ".", "key": "D"}]},
    )
    assert error_of(path) == "train.jsonl: line 1: field 'key': expected one of the option letters A, B, got 'D'"


def test_answer_type_math(tmp_path):
    path = write_task(
        tmp_path,
        """
        name: m
        data: {test: train.jsonl}
        fields: {question: q, solution: sol}
        answer_from: last_boxed
        answer_type: math
        """,
        {"train": [{"q": "5/6?", "sol": "first \\boxed{1}, then $\\boxed{\\frac{5}{6}}$."}]},
    )
    task = get_task(str(path))
    ex = task.load("test")[0]
    assert ex.answer == "\\frac{5}{6}"  # the LAST box
    assert task.grade("so \\boxed{\\frac{10}{12}}", ex) == Graded("\\frac{10}{12}", True)  # math-verify, in the worker
    assert task.grade("\\boxed{0.8333}", ex) == Graded("0.8333", False)
    assert task.grade("The answer is 5/6", ex, strict=True) == Graded(None, False)
    assert task.grade("The answer is \\frac56", ex) == Graded("\\frac56", True)


def test_answer_type_exact(tmp_path):
    task = get_task(str(write_task(tmp_path, EXACT, {"train": QA_ROWS})))
    paris, _, ny = task.load("train")
    assert [paris.answer, ny.answer] == ["Paris", "New York"]  # whitespace normalised
    assert task.grade("I think\n####   Paris  \nmore text", paris) == Graded("Paris", True)
    assert task.grade("#### paris", paris) == Graded("paris", False)  # case matters
    assert task.grade("#### New York", ny) == Graded("New York", True)
    assert task.grade("it is\nParis", paris) == Graded("Paris", True)  # flexible: the last line
    assert task.grade("it is\nParis", paris, strict=True) == Graded(None, False)
    boxed = write_task(
        tmp_path,
        """
        name: e
        data: {train: b.jsonl}
        fields: {question: q, solution: sol}
        answer_from: last_boxed
        answer_type: exact
        """,
        name="b.yaml",
    )
    (tmp_path / "b.jsonl").write_text(json.dumps({"q": "?", "sol": "so \\boxed{x  + 1}"}) + "\n")
    task = get_task(str(boxed))
    ex = task.load("train")[0]
    assert ex.answer == "x + 1" and task.grade("\\boxed{x + 1}", ex).correct
    assert not task.grade("\\boxed{1 + x}", ex).correct  # strings, not maths


def test_number_from_last_boxed(tmp_path):
    path = write_task(
        tmp_path,
        """
        name: nb
        data: {train: train.jsonl}
        fields: {question: q, solution: sol}
        answer_from: last_boxed
        answer_type: number
        """,
        {"train": [{"q": "?", "sol": "3 and 4 make \\boxed{7}."}]},
    )
    task = get_task(str(path))
    ex = task.load("train")[0]
    assert ex.answer == "7"
    assert task.grade("\\boxed{7.0} then 9", ex) == Graded("7", True)
    assert task.grade("7 then 9", ex, strict=True) == Graded(None, False)
    assert task.grade("7 then 9", ex) == Graded("9", False)


# ------------------------------------------------------------------ answer_from and data rows


@pytest.mark.parametrize(
    "body, rows, message",
    [
        (
            "fields: {question: q, solution: sol}\nanswer_type: number",
            [{"q": "?", "sol": "no marker, 5"}],
            "train.jsonl: line 1: field 'sol': expected the answer marker '####' exactly once, found it 0 times",
        ),
        (
            "fields: {question: q, solution: sol}\nanswer_type: number",
            [{"q": "?", "sol": "#### 1\n#### 2"}],
            "train.jsonl: line 1: field 'sol': expected the answer marker '####' exactly once, found it 2 times",
        ),
        (
            "fields: {question: q, solution: sol}\nanswer_type: number",
            [{"q": "?", "sol": "#### 5"}, {"q": "?", "sol": "#### five"}],
            "train.jsonl: line 2: field 'sol': expected a number as the answer, got 'five'",
        ),
        (
            "fields: {question: q, solution: sol}\nanswer_from: last_boxed\nanswer_type: math",
            [{"q": "?", "sol": "it is \\boxed{5"}],
            "train.jsonl: line 1: field 'sol': expected a closed, non-empty \\boxed{...} answer",
        ),
        (
            "fields: {question: q, solution: sol, answer: gold}\nanswer_type: number",
            [{"q": "?", "sol": "#### 5"}],
            "train.jsonl: line 1: field 'gold': missing field",
        ),
        (
            "fields: {question: q, solution: sol, answer: gold}\nanswer_type: number",
            [{"q": "?", "sol": "x", "gold": True}],
            "train.jsonl: line 1: field 'gold': expected str or number, got bool",
        ),
        (
            "fields: {question: q, solution: sol}\nanswer_type: number",
            [{"q": 3, "sol": "#### 5"}],
            "train.jsonl: line 1: field 'q': expected str, got int",
        ),
        (
            "fields: {question: q, solution: sol, id: key}\nanswer_type: number",
            [{"q": "?", "sol": "#### 5", "key": "a"}, {"q": "?", "sol": "#### 6", "key": "a"}],
            "train.jsonl: line 2: field 'key': duplicate id 'a' (first at line 1)",
        ),
        (
            'fields: {question: q, solution: sol}\nprompt: "{topic}: {question}"\nanswer_type: number',
            [{"q": "?", "sol": "#### 5"}],
            "train.jsonl: line 1: field 'topic': missing field (a template of the task file uses {topic})",
        ),
    ],
)
def test_data_row_errors(tmp_path, body, rows, message):
    path = write_task(tmp_path, "name: t\ndata: {train: train.jsonl}\n" + body, {"train": rows})
    assert error_of(path) == message


def test_data_file_errors(tmp_path):
    path = write_task(tmp_path, EXACT, {"train": QA_ROWS})
    (tmp_path / "train.jsonl").write_text('{"q": "ok", "sol": "#### a"}\n{not json\n')
    assert error_of(path).startswith("train.jsonl: line 2: not valid JSON")
    (tmp_path / "train.jsonl").unlink()
    assert error_of(path) == "train.jsonl: file does not exist"


def test_ids_default_and_from_field(tmp_path):
    task = get_task(str(write_task(tmp_path, EXACT, {"train": QA_ROWS})))
    assert [e.id for e in task.load("train")] == ["capitals-train-0", "capitals-train-1", "capitals-train-2"]
    path = write_task(
        tmp_path,
        EXACT.replace("solution: sol}", "solution: sol, id: n}"),
        {"train": [dict(r, n=10 + i) for i, r in enumerate(QA_ROWS)]},
    )
    assert [e.id for e in get_task(str(path)).load("test")] == ["10", "11", "12"]


def test_validation_from_train(tmp_path):
    rows = [{"q": f"q{i}", "sol": f"#### {i}"} for i in range(5)]
    path = write_task(
        tmp_path,
        """
        name: v
        data: {train: train.jsonl, validation_from_train: 2}
        fields: {question: q, solution: sol}
        answer_type: number
        """,
        {"train": rows},
    )
    task = get_task(str(path))
    assert task.splits == ("train", "validation")
    assert [e.answer for e in task.load("train")] == ["0", "1", "2"]
    assert [e.id for e in task.load("validation")] == ["v-train-3", "v-train-4"]  # keep their train index
    path.write_text(path.read_text().replace("validation_from_train: 2", "validation_from_train: 5"))
    assert error_of(path) == (
        "task.yaml: line 2: field 'data.validation_from_train': holding out 5 rows leaves "
        "no training rows (the train split has 5)"
    )
    with pytest.raises(ValueError, match="unknown split 'test'"):
        task.load("test")


def test_parquet_data(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "problem": ["What is 1/2 + 1/2?", "What is 2 * 3?"],
            "solution": ["$\\boxed{1}$", "$2 \\cdot 3 = \\boxed{6}$"],
        }
    )
    pq.write_table(table, tmp_path / "test.parquet")
    path = write_task(
        tmp_path,
        """
        name: pq
        data: {test: test.parquet}
        fields: {question: problem, solution: solution}
        answer_from: last_boxed
        answer_type: math
        """,
    )
    task = get_task(str(path))
    exs = task.load("test")
    assert [(e.question, e.answer) for e in exs] == [("What is 1/2 + 1/2?", "1"), ("What is 2 * 3?", "6")]
    assert task.grade("\\boxed{6}", exs[1]).correct
    pq.write_table(
        pa.table({"problem": ["ok", None], "solution": ["\\boxed{1}", "\\boxed{2}"]}), tmp_path / "test.parquet"
    )
    assert error_of(path) == "test.parquet: line 2: field 'problem': expected str, got NoneType"
    (tmp_path / "test.parquet").write_bytes(b"not parquet")
    assert error_of(path).startswith("test.parquet: not a readable Parquet file (")


# ------------------------------------------------------------------ templates


@pytest.mark.parametrize(
    "template, shown",
    [
        ("{question.__class__}", "{question.__class__}"),
        ("{question[0]}", "{question[0]}"),
        ("{}", "{}"),
        ("{question!r}", "{question!r}"),
        ("{question:>99}", "{question:>99}"),
    ],
)
def test_prompt_template_allows_only_plain_names(tmp_path, template, shown):
    path = write_task(tmp_path, EXACT + f"prompt: {json.dumps(template)}\n", {"train": QA_ROWS})
    assert error_of(path) == (
        "task.yaml: line 5: field 'prompt': only {name} substitutions are allowed (no "
        f"attribute access, indexing, conversion or format spec), got '{shown}'"
    )


@pytest.mark.parametrize(
    "template, message",
    [
        (
            "Q: {question",
            "not a valid template (expected '}' before end of string; write a literal brace as '{{' or '}}')",
        ),
        ("Q:", "the template must contain {question}"),
        (
            "{question} {answer}",
            "the prompt must not contain {solution} or {answer}: it would show the model what it is asked to produce",
        ),
        ("{question} {options}", "{options} is only available with answer_type 'choice'"),
    ],
)
def test_prompt_template_errors(tmp_path, template, message):
    path = write_task(tmp_path, EXACT + f"prompt: {json.dumps(template)}\n", {"train": QA_ROWS})
    assert error_of(path) == f"task.yaml: line 5: field 'prompt': {message}"


def test_prompt_template_substitutes_columns_and_nothing_else(tmp_path):
    rows = [{"q": "What does {question} mean? {0} {__class__}", "sol": "#### x", "topic": "Braces"}]
    path = write_task(tmp_path, EXACT + 'prompt: "[{topic}] {{literal}} {question}\\nA:"\n', {"train": rows})
    task = get_task(str(path))
    ex = task.load("train")[0]
    # The question's own braces are text, never a template; `{{` is a literal brace.
    assert task.prompt(ex) == "[Braces] {literal} What does {question} mean? {0} {__class__}\nA:"


# ------------------------------------------------------------------ bad task files


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {question: q, solution: s}\nanswer_type: numeric\n",
            "task.yaml: line 4: field 'answer_type': expected one of number, choice, math, exact, got 'numeric'",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {question: q, solution: s}\n",
            "task.yaml: field 'answer_type': missing required key (one of number, choice, math, exact)",
        ),
        (
            "data: {train: a.jsonl}\nfields: {question: q, solution: s}\nanswer_type: exact\n",
            "task.yaml: field 'name': missing required key",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {question: q, solution: s}\nanswer_type: exact\npromt: x\n",
            "task.yaml: line 5: field 'promt': unknown key (known: name, description, data, fields, answer_type, "
            "answer_from, answer_marker, prompt, reference, stop)",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {question: q, soltion: s}\nanswer_type: exact\n",
            "task.yaml: line 3: field 'fields.soltion': unknown key (known: question, solution, answer, options, id)",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {solution: s}\nanswer_type: exact\n",
            "task.yaml: line 3: field 'fields.question': missing required key",
        ),
        (
            "name: t\ndata:\n  train: a.csv\nfields: {question: q, solution: s}\nanswer_type: exact\n",
            "task.yaml: line 3: field 'data.train': expected a .jsonl or .parquet file, got 'a.csv'",
        ),
        (
            "name: t\ndata:\n  train: ${HOME}/a.jsonl\nfields: {question: q, solution: s}\nanswer_type: exact\n",
            "task.yaml: line 3: field 'data.train': the only variable a path may use is ${AFTUNE_DATA}, at its start; "
            "got '${HOME}/a.jsonl'",
        ),
        (
            "name: t\ndata:\n  train: a.jsonl\n  validation: b.jsonl\n  validation_from_train: 5\n"
            "fields: {question: q, solution: s}\nanswer_type: exact\n",
            "task.yaml: line 5: field 'data.validation_from_train': the data already has a validation split",
        ),
        (
            "name: t\ndata:\n  train: a.jsonl\n  validation_from_train: 0\nfields: {question: q, solution: s}\n"
            "answer_type: exact\n",
            "task.yaml: line 4: field 'data.validation_from_train': expected a positive integer, got 0",
        ),
        (
            "name: t\ndata: {}\nfields: {question: q, solution: s}\nanswer_type: exact\n",
            "task.yaml: line 2: field 'data': expected data files (train, validation, test) or a hub dataset (hub)",
        ),
        (
            "name: t\ndata:\n  hub: {path: org/ds}\nfields: {question: q, solution: s}\nanswer_type: exact\n",
            "task.yaml: line 3: field 'data.hub.splits': missing required key (e.g. {train: train, test: test})",
        ),
        (
            "name: t\ndata:\n  train: a.jsonl\n  hub: {path: org/ds, splits: {train: train}}\n"
            "fields: {question: q, solution: s}\nanswer_type: exact\n",
            "task.yaml: line 4: field 'data.hub': give data files or a hub dataset, not both (the hub is the fallback "
            "only for files under ${AFTUNE_DATA}, as for the built-in tasks)",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {question: q}\nanswer_type: exact\n",
            "task.yaml: line 3: field 'fields.solution': missing: answer_from 'after_marker' reads the answer from the "
            "solution",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {question: q, solution: s}\nanswer_from: field\nanswer_type: exact\n",
            "task.yaml: line 3: field 'fields.answer': missing: answer_from is 'field', so fields.answer must name the "
            "column that holds the gold answer",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {question: q, solution: s, answer: a}\nanswer_from: last_boxed\n"
            "answer_type: math\n",
            "task.yaml: line 3: field 'fields.answer': not used with answer_from 'last_boxed' (the answer comes from the "
            "solution); remove it or set answer_from: field",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {question: q, solution: s}\nanswer_type: choice\n",
            "task.yaml: line 3: field 'fields.options': missing: answer_type 'choice' needs the column(s) holding the "
            "options",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: {question: q, solution: s}\nanswer_from: boxed\nanswer_type: math\n",
            "task.yaml: line 4: field 'answer_from': expected one of after_marker, last_boxed, field, got 'boxed'",
        ),
        (
            "name: my task\ndata: {train: a.jsonl}\nfields: {question: q, solution: s}\nanswer_type: exact\n",
            "task.yaml: line 1: field 'name': expected letters, digits, '_', '-' or '.' (it is part of every example id), "
            "got 'my task'",
        ),
        (
            'name: t\ndata: {train: a.jsonl}\nfields: {question: q, solution: s}\nanswer_type: exact\nstop: [""]\n',
            "task.yaml: line 5: field 'stop': entry 0: expected a non-empty string, got ''",
        ),
        (
            "name: t\ndata: {train: a.jsonl}\nfields: [question]\nanswer_type: exact\n",
            "task.yaml: line 3: field 'fields': expected a mapping, got list",
        ),
        (
            "name: t\n  data: x\n",
            "task.yaml: line 2: not valid YAML (mapping values are not allowed "
            + ("in this context)" if hasattr(yaml, "CSafeLoader") else "here)"),  # libyaml's wording, else PyYAML's
        ),
        ("- just\n- a list\n", "task.yaml: expected a mapping of keys to values, got list"),
        ("", "task.yaml: expected a mapping of keys to values, got null"),
    ],
)
def test_bad_task_file_errors(tmp_path, text, message):
    path = tmp_path / "task.yaml"
    path.write_text(text)
    assert error_of(path) == message


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    assert error_of(path).startswith("task.yaml: line 1: not valid YAML (")


def test_bad_task_file_via_cli_is_one_error_line(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("name: t\ndata: {train: a.jsonl}\nfields: {question: q, solution: s}\nanswer_type: numeric\n")
    r = cli("eval", "--task", path, "--model", tmp_path / "nothing", "--out", tmp_path / "e.json")
    assert r.code == 2
    assert r.error_lines == [
        f"error: {path}: line 4: field 'answer_type': expected one of number, choice, math, exact, got 'numeric'"
    ]
    r = cli("eval", "--task", tmp_path / "missing.yaml", "--model", tmp_path / "nothing")
    assert r.code == 2 and r.error_lines == [f"error: {tmp_path / 'missing.yaml'}: task file does not exist"]


# ------------------------------------------------------------------ registry and `aftune tasks`


def test_get_tasks_mixes_files_and_names_and_checks_options():
    arith, math = get_tasks(f"arith,{MATH_YAML}", {"n_train": 5, "n_shot": 1})
    assert (arith.name, math.name) == ("arith", "math_tiny")
    first = math.load("train")[0]
    test_ex = math.load("test")[0]
    assert math.prompt(test_ex).startswith(f"Problem: {first.question}\nSolution:\n{first.reference}\n\n")
    with pytest.raises(
        ValueError, match="task 'configs/tasks/math_tiny.yaml' has no option.s. n_train; it takes: data_dir, n_shot"
    ):
        get_tasks("configs/tasks/math_tiny.yaml", {"n_train": 5})


def test_describe_tasks_lists_builtins_and_task_files(tmp_path):
    (tmp_path / "good.yml").write_text(EXACT.replace("    ", "") + 'description: "capitals of Europe"\n')
    (tmp_path / "bad.yaml").write_text("name: t\n")
    (tmp_path / "notes.txt").write_text("not a task")
    infos = describe_tasks([str(tmp_path)], discover=False)
    assert [t.task for t in infos[:4]] == ["aqua", "arith", "ecqa", "gsm8k"]
    assert all(t.description for t in infos[:4])
    by_name = {Path(t.task).name: t for t in infos[4:]}
    assert sorted(by_name) == ["bad.yaml", "good.yml"]
    assert (by_name["good.yml"].name, by_name["good.yml"].description) == ("capitals", "capitals of Europe")
    assert by_name["bad.yaml"].error.endswith(
        "bad.yaml: field 'answer_type': missing required key (one of number, choice, math, exact)"
    )
    lines = format_task_list(infos)
    assert lines[5].endswith("  [capitals] capitals of Europe") and "  INVALID: " in lines[4]
    with pytest.raises(InputError, match="no such task file or folder"):
        describe_tasks([str(tmp_path / "nope")])


def test_aftune_tasks_command(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = cli("tasks")
    assert r.code == 0, r.stderr
    lines = r.stdout.splitlines()
    firsts = [ln.split()[0] for ln in lines]
    assert firsts[:4] == ["aqua", "arith", "ecqa", "gsm8k"]
    assert "configs/tasks/gsm8k.yaml" in firsts and "configs/tasks/math_tiny.yaml" in firsts
    assert any(ln.startswith("configs/tasks/math_tiny.yaml") and "hand-written MATH-style" in ln for ln in lines)
    (tmp_path / "bad.yaml").write_text("name: [\n")
    r = cli("tasks", tmp_path / "bad.yaml")
    assert r.code == 1 and "INVALID: " in r.stdout.splitlines()[-1]
    r = cli("tasks", tmp_path / "absent.yaml")
    assert r.code == 2 and r.error_lines == [f"error: {tmp_path / 'absent.yaml'}: no such task file or folder"]


# ------------------------------------------------------------------ the documented example run


TINY_MODEL = [
    "--model",
    "tiny",
    "--tiny-hidden",
    "32",
    "--tiny-layers",
    "1",
    "--tiny-heads",
    "2",
    "--vocab-size",
    "300",
]


def test_example_run_through_task_file(tmp_path, monkeypatch):
    """docs/task-files.md's example run, shrunk: sft -> sample -> align -> eval with --task math_tiny.yaml."""
    monkeypatch.chdir(REPO)  # the documented commands use the relative path
    task = "configs/tasks/math_tiny.yaml"
    r = cli(
        "sft",
        "--task",
        task,
        *TINY_MODEL,
        "--max-steps",
        "4",
        "--eval-steps",
        "4",
        "--batch-size",
        "8",
        "--n-validation",
        "4",
        "--no-eval-accuracy",
        "--quiet",
        "--out",
        tmp_path / "vft",
    )
    assert r.code == 0, r.stderr
    model = tmp_path / "vft" / "model"
    assert (model / "config.json").exists()

    cands = tmp_path / "cands.jsonl"
    r = cli(
        "sample",
        "--task",
        task,
        "--model",
        model,
        "--k",
        "2",
        "--n-questions",
        "4",
        "--max-new-tokens",
        "16",
        "--batch-size",
        "4",
        "--quiet",
        "--out",
        cands,
    )
    assert r.code == 0, r.stderr
    groups = [json.loads(line) for line in cands.read_text().splitlines()]
    train = {e.id: e for e in get_task(task).load("train")}
    assert len(groups) == 4
    for g in groups:
        assert g["task"] == "math_tiny" and g["answer"] == train[g["id"]].answer
        assert g["prompt"] == f"Problem: {train[g['id']].question}\nSolution:\n"
        assert 1 <= len(g["candidates"]) <= 2
        for c in g["candidates"]:  # labelled by the task file's grader
            assert isinstance(c["correct"], bool) and (c["answer"] is None or isinstance(c["answer"], str))
            assert c["correct"] == get_task(task).grade(c["text"], train[g["id"]]).correct

    r = cli(
        "align",
        "--task",
        task,
        "--model",
        model,
        "--candidates",
        cands,
        "--method",
        "bc",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--quiet",
        "--out",
        tmp_path / "bc",
    )
    assert r.code == 0, r.stderr
    assert (tmp_path / "bc" / "model" / "config.json").exists()

    out = tmp_path / "bc" / "eval.json"
    r = cli(
        "eval",
        "--task",
        task,
        "--model",
        tmp_path / "bc" / "model",
        "--split",
        "test",
        "--n-questions",
        "4",
        "--max-new-tokens",
        "16",
        "--quiet",
        "--out",
        out,
    )
    assert r.code == 0, r.stderr
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["task"] == task
    preds = [json.loads(line) for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    test = {e.id: e for e in get_task(task).load("test")}
    assert [p["id"] for p in preds] == [f"math_tiny-test-{i}" for i in range(4)]
    for p in preds:
        assert p["task"] == "math_tiny" and p["gold"] == test[p["id"]].answer
        assert isinstance(p["correct"], bool) and "prediction" in p
    assert metrics["accuracy"] == sum(p["correct"] for p in preds) / 4
