import random
import re
import time

import pytest

from aftune.tasks import get_task
from aftune.tasks.answers import check_annotations, equation_list, extract_number
from aftune.tasks.arith import MAX_VALUE, ArithTask, generate_problem, sample_solution

SMALL = dict(n_train=300, n_validation=100, n_test=200)


@pytest.fixture(scope="module")
def task():
    return ArithTask(seed=0, **SMALL)


def test_registry_and_prompt(task):
    t = get_task("arith", **SMALL)
    assert isinstance(t, ArithTask) and t.name == "arith"
    ex = task.load("test")[12]
    assert ex.id == "arith-test-00012"
    assert task.prompt(ex) == f"Question: {ex.question}\nAnswer:\n"
    assert not ex.reference.startswith((" ", "\n"))
    assert ex.reference.splitlines()[-1] == f"#### {ex.answer}"


def test_deterministic_under_seed():
    a, b, c = ArithTask(seed=3, **SMALL), ArithTask(seed=3, **SMALL), ArithTask(seed=4, **SMALL)
    for split in ("train", "validation", "test"):
        assert [e.to_dict() for e in a.load(split)] == [e.to_dict() for e in b.load(split)]
    assert [e.question for e in a.load("test")] != [e.question for e in c.load("test")]


def test_eval_splits_do_not_depend_on_n_train():
    a, b = ArithTask(n_train=50, n_validation=20, n_test=30), ArithTask(n_train=400, n_validation=20, n_test=30)
    assert [e.to_dict() for e in a.load("test")] == [e.to_dict() for e in b.load("test")]
    assert [e.to_dict() for e in a.load("validation")] == [e.to_dict() for e in b.load("validation")]


def test_splits_sizes_and_disjoint(task):
    qs = {s: [e.question for e in task.load(s)] for s in task.splits}
    assert {s: len(v) for s, v in qs.items()} == {"train": 300, "validation": 100, "test": 200}
    for s, v in qs.items():
        assert len(set(v)) == len(v), s
    assert not set(qs["train"]) & set(qs["test"])
    assert not set(qs["train"]) & set(qs["validation"])
    assert not set(qs["validation"]) & set(qs["test"])
    ids = [e.id for s in task.splits for e in task.load(s)]
    assert len(set(ids)) == len(ids)
    with pytest.raises(ValueError):
        task.load("dev")


@pytest.mark.parametrize("ops", ["+-*", "+-*/", "+", "+-"])
def test_references_correct_and_annotations_valid(ops):
    t = ArithTask(seed=1, ops=ops, **SMALL)
    for ex in t.load("train") + t.load("test"):
        assert t.grade(ex.reference, ex).correct
        assert extract_number(ex.reference, strict=True) == ex.answer
        checks = check_annotations(ex.reference)
        assert checks and all(checks), ex.reference
        assert len(checks) == ex.meta["steps"]  # one annotated binary operation per step
        assert t.wrong_steps(ex.reference) == 0
        assert int(ex.answer) >= 0


def test_many_distinct_valid_solutions(task):
    rng = random.Random(0)
    distinct_texts, distinct_eqs = [], []
    for ex in task.load("test")[:100]:
        paths = task.solution_paths(ex, 10, rng)
        for s in paths:
            assert all(check_annotations(s)) and task.grade(s, ex).correct
        distinct_texts.append(len(set(paths)))
        distinct_eqs.append(len({equation_list(s) for s in paths}))
    assert sum(distinct_texts) / len(distinct_texts) >= 3
    # Distinct calculator paths too, not only wording (RFT dedupes on equation lists).
    assert sum(distinct_eqs) / len(distinct_eqs) >= 3


def test_solution_paths_vary_order_and_grouping():
    # Two products and three signed terms: independent-step order and operand order both vary.
    problem = {
        "name": "Ann",
        "pron": "she",
        "obj": "her",
        "friend": "Ben",
        "item": "apples",
        "final": None,
        "steps": 4,
        "answer": 12 + 21 + 10,
        "terms": [
            {"kind": "lit", "a": 12, "sign": 1, "act": "Ann has"},
            {"kind": "mul", "a": 3, "b": 7, "container": "bags", "sign": 1, "act": "She buys"},
            {"kind": "mul", "a": 2, "b": 5, "container": "boxes", "sign": 1, "act": "Ben gives her"},
        ],
    }
    rng = random.Random(0)
    eqs = {equation_list(sample_solution(problem, rng)) for _ in range(200)}
    firsts = {e[0] for e in eqs}
    assert {"3*7=21", "7*3=21", "2*5=10", "5*2=10"} <= firsts  # either product first, either order
    assert any("21+10=31" in e or "10+21=31" in e for e in eqs)  # gains grouped before the base
    assert any("12+21=33" in e or "21+12=33" in e for e in eqs)  # applied one by one
    assert len(eqs) >= 10


def test_knobs_respected():
    t = ArithTask(seed=2, min_steps=3, max_steps=3, max_number=9, ops="+-*/", **SMALL)
    exs = t.load("train")
    assert {e.meta["steps"] for e in exs} == {3}
    for e in exs:
        nums = [int(n) for n in re.findall(r"\d+", e.question)]
        assert nums and all(1 <= n <= 9 for n in nums), e.question
        assert len(check_annotations(e.reference)) == 3
        assert all(int(n) <= MAX_VALUE for n in re.findall(r"\d+", e.reference))
    shared = [e for e in exs if "/" in e.reference]
    assert shared and all(int(e.answer) >= 2 for e in shared)  # no degenerate "each gets 1" shares
    plus = ArithTask(seed=2, ops="+", **SMALL).load("train")
    assert all("-" not in e.reference and "*" not in e.reference for e in plus)
    steps = {e.meta["steps"] for e in ArithTask(seed=2, **SMALL).load("train")}
    assert steps == {2, 3, 4}


def test_max_value_bounds_every_path():
    t = ArithTask(seed=3, min_steps=3, max_steps=4, max_number=20, max_value=200, **SMALL)
    for e in t.load("train") + t.load("test"):
        assert all(int(n) <= 200 for n in re.findall(r"\d+", e.reference)), e.reference
        rng = random.Random(e.id)
        for path in ArithTask.solution_paths(e, 4, rng):  # not just the reference: every order of the steps
            assert all(int(n) <= 200 for n in re.findall(r"\d+", path))


def test_corpus_documents_hold_several_problems_and_never_the_test_split():
    kw = dict(seed=4, min_steps=1, max_steps=2, max_number=20, max_value=200, n_train=400, n_validation=20, n_test=50)
    corpus = ArithTask(per_doc=3, **kw)
    train, test = corpus.load("train"), corpus.load("test")
    assert all(e.reference.count("\nQuestion: ") == 2 and e.reference.count("#### ") == 3 for e in train)
    assert all("Question:" not in e.reference for e in test)  # the test split stays one problem per example
    test_questions = {e.question for e in test}
    for e in train:
        questions = [e.question] + re.findall(r"Question: (.*)\nAnswer:", e.reference)
        assert len(questions) == 3 and not test_questions & set(questions)
        for _, sol in zip(
            questions,
            [e.reference.split("\n\nQuestion:")[0]] + re.findall(r"Answer:\n(.*?)(?:\n\n|$)", e.reference, re.S),
        ):
            assert all(check_annotations(sol)) and "#### " in sol
    # per_doc=1 is the plain task, example for example
    assert [e.reference for e in ArithTask(**kw).load("train")] == [
        e.reference for e in ArithTask(per_doc=1, **kw).load("train")
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(ops="-*"),
        dict(ops="+%"),
        dict(min_steps=3, max_steps=2),
        dict(min_steps=0),
        dict(max_number=1),
        dict(per_doc=0),
        dict(max_number=20, max_value=30),
    ],
)
def test_bad_knobs_rejected(kwargs):
    with pytest.raises(ValueError):
        ArithTask(**kwargs)


def test_too_small_space_is_an_error_not_a_hang():
    t = ArithTask(min_steps=1, max_steps=1, max_number=2, ops="+", n_train=50, n_validation=5, n_test=5)
    with pytest.raises(ValueError):
        t.load("train")


def test_grading(task):
    ex = task.load("test")[0]
    gold = int(ex.answer)
    assert task.grade(f"blah\n#### {gold}", ex).correct
    assert task.grade(f"The answer is {gold}.00", ex).correct
    assert not task.grade(f"#### {gold + 1}", ex).correct
    assert not task.grade("I don't know", ex).correct
    wrong = ex.reference.rsplit("#### ", 1)[0] + f"#### {gold + 1}"
    assert not task.grade(wrong, ex).correct
    assert task.extract_answer("#### 1,234") == "1234"
    assert task.answers_match("12.0", "12") and not task.answers_match(None, "12")


def test_wrong_step_counted(task):
    ex = task.load("test")[1]
    lines = ex.reference.splitlines()
    m = re.search(r"<<([^=]+)=(\d+)>>", lines[0])
    lines[0] = lines[0].replace(f"={m.group(2)}>>", f"={int(m.group(2)) + 1}>>")
    assert task.wrong_steps("\n".join(lines)) == 1


def test_lengths_and_speed():
    t0 = time.perf_counter()
    t = ArithTask(n_train=10000, n_validation=0, n_test=0)
    exs = t.load("train")
    assert time.perf_counter() - t0 < 5.0
    lens = sorted(len(e.question) + len(e.reference) for e in exs)
    median = lens[len(lens) // 2]
    assert 150 <= median <= 320 and lens[-1] <= 450


def test_generate_problem_is_json_like():
    import json

    p = generate_problem(random.Random(5))
    assert json.loads(json.dumps(p)) == p
