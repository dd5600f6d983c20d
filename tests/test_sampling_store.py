"""The resumable sample step: labelling, dedupe, crash-safe resume, config mismatch, candidate-file reading."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny import char_tokenizer, tiny_llama

import aftune.sampling.store as store
from aftune.io import InputError
from aftune.records import Example, meta_path_for, read_groups
from aftune.sampling import Sample, SamplingConfig
from aftune.sampling.store import build_group, dedupe_samples, sample_candidates
from aftune.tasks.base import Task

torch.set_num_threads(1)


class HashTask(Task):
    """Minimal task: the answer is whatever follows the last '####'."""

    name = "hash"

    def load(self, split: str) -> list[Example]:
        return list(EXAMPLES)

    def extract_answer(self, completion: str, example=None, strict: bool = False) -> str | None:
        if "####" not in completion:
            return None
        ans = completion.rsplit("####", 1)[1].strip()
        return ans or None


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


EXAMPLES = [
    Example(
        id=f"q{i}",
        question=f"tom has {i} pens and gets {i + 2} more" + " x" * (i % 3),
        reference=f"{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2}",
        answer=str(2 * i + 2),
    )
    for i in range(7)
]
CFG = SamplingConfig(k=4, max_new_tokens=10, temperature=1.0, batch_size=2, seed=0)


def lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_build_group_labels_dedupes_and_ranks():
    task, ex = HashTask(), Example(id="a", question="q", reference="r\n#### 5", answer="5")
    samples = [
        Sample("2 + 3 = <<2+3=5>>5\n#### 5", [3], -1.0, 2),
        Sample("  2 + 3 =  <<2+3=5>>5 \n####   5", [4], -9.0, 3),  # whitespace variant of the first
        Sample("2 + 3 = <<2+3=6>>6\n#### 6", [5], -2.0, 4),
        Sample("2 + 3 = <<2+3=6>>5\n#### 5", [6], -3.0, 3),  # right answer, one wrong step
        Sample("no answer", [7], -4.0, 1),
    ]
    kept, n_dup = dedupe_samples(samples)
    assert n_dup == 1 and kept[0] is samples[0] and samples[1] not in kept
    g = build_group(task, ex, "PROMPT", samples, k=5)
    assert (g.id, g.task, g.prompt, g.reference, g.answer) == ("a", "hash", "PROMPT", ex.reference, "5")
    assert g.meta == {"k": 5, "n_duplicates": 1}
    assert [c.answer for c in g.candidates] == ["5", "6", "5", None]
    assert [c.correct for c in g.candidates] == [True, False, True, False]
    assert [c.wrong_steps for c in g.candidates] == [0, 1, 1, 0]
    assert [c.score for c in g.candidates] == [-0.5, -0.5, -1.0, -4.0]
    ranks = [c.rank for c in g.candidates]
    assert ranks[0] == 0 and ranks[0] < ranks[2] < min(ranks[1], ranks[3])  # correct & clean best


def test_sample_candidates_writes_labelled_groups_and_stats(model, tok, tmp_path):
    out = tmp_path / "cands.jsonl"
    task = HashTask()
    stats = sample_candidates(model, tok, task, EXAMPLES, out, CFG, model_name="tiny", progress=False)
    groups = read_groups(out)
    assert sorted(g.id for g in groups) == sorted(e.id for e in EXAMPLES)
    by_id = {e.id: e for e in EXAMPLES}
    n_cands = 0
    for g in groups:
        ex = by_id[g.id]
        assert g.prompt == task.prompt(ex) and g.answer == ex.answer and g.meta["k"] == 4
        assert len(g.candidates) + g.meta["n_duplicates"] == 4
        texts = [" ".join(c.text.split()) for c in g.candidates]
        assert len(set(texts)) == len(texts)
        for c in g.candidates:
            assert c.correct == task.grade(c.text, ex).correct and c.answer == task.extract_answer(c.text)
            assert c.rank is not None and c.score is not None and c.score < 0
        n_cands += len(g.candidates)
    assert stats["questions"] == 7 and stats["candidates"] == n_cands and stats["new_questions"] == 7
    assert stats["new_samples"] == 28 and stats["samples_per_s"] > 0
    meta = json.loads(meta_path_for(out).read_text())
    assert meta["status"] == "complete" and meta["stats"]["candidates"] == n_cands
    assert meta["task"] == "hash" and meta["model"] == "tiny" and meta["sampling"]["k"] == 4
    assert meta["tokenizer"]["vocab_size"] == len(tok)


def test_stats_count_correct_and_mixed(tmp_path):
    path = tmp_path / "g.jsonl"
    mk = lambda gid, flags: {
        "id": gid,
        "task": "hash",
        "prompt": "p",
        "reference": "r",
        "answer": "1",  # noqa: E731
        "candidates": [{"text": str(i), "answer": None, "correct": f} for i, f in enumerate(flags)],
    }
    path.write_text(
        "".join(json.dumps(mk(g, f)) + "\n" for g, f in [("a", [True, False, True]), ("b", [False]), ("c", [True])])
    )
    s = store.group_stats(read_groups(path))
    assert s["questions"] == 3 and s["candidates"] == 5
    assert s["frac_correct"] == pytest.approx(3 / 5)
    assert s["distinct_correct_per_question"] == pytest.approx(1.0)
    assert s["frac_mixed"] == pytest.approx(1 / 3)


def by_id(path) -> dict[str, dict]:
    return {(g := json.loads(x))["id"]: g for x in lines(path)}


def same_candidates(a: dict[str, dict], b: dict[str, dict]) -> bool:
    """Same questions, candidate texts and labels; scores equal up to float rounding (a batch of another shape
    rounds the same logits differently in the last bits)."""
    strip = lambda g: {**g, "candidates": [{**c, "score": round(c["score"], 4)} for c in g["candidates"]]}
    return a.keys() == b.keys() and all(strip(a[i]) == strip(b[i]) for i in a)


def test_resume_after_interruption(model, tok, tmp_path, monkeypatch):
    straight = tmp_path / "straight.jsonl"
    sample_candidates(model, tok, HashTask(), EXAMPLES, straight, CFG, progress=False)
    out = tmp_path / "cands.jsonl"
    real = store.append_jsonl
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while the third set of finished questions is stored
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "append_jsonl", dying)
    with pytest.raises(KeyboardInterrupt):
        sample_candidates(model, tok, HashTask(), EXAMPLES, out, CFG, progress=False)
    monkeypatch.setattr(store, "append_jsonl", real)
    before = lines(out)
    assert 2 <= len(before) < len(EXAMPLES)  # two appends of finished questions made it
    assert json.loads(meta_path_for(out).read_text())["status"] == "running"
    torn = json.dumps({"id": "q6", "task": "hash", "prompt": "p", "candidates": []})[:30]
    with open(out, "ab") as f:  # a kill in the middle of the next append
        f.write(torn.encode())

    stats = sample_candidates(model, tok, HashTask(), EXAMPLES, out, CFG, progress=False)
    after = lines(out)
    assert after[: len(before)] == before  # records already written are untouched, byte for byte
    ids = [json.loads(x)["id"] for x in after]
    assert sorted(ids) == sorted(e.id for e in EXAMPLES)  # every question exactly once, torn line gone
    assert stats["resumed_questions"] == len(before) and stats["questions"] == 7
    # per-question seeds: the killed-and-resumed file holds the straight run's candidates, question by question
    assert same_candidates(by_id(out), by_id(straight))

    again = sample_candidates(model, tok, HashTask(), EXAMPLES, out, CFG, progress=False)
    assert again["new_questions"] == 0 and lines(out) == after


def test_candidates_do_not_depend_on_batch_size_or_company(model, tok, tmp_path):
    """A question's samples depend on (seed, question id) only: batch size, continuous batching and which other
    questions are sampled with it change nothing."""
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    sample_candidates(model, tok, HashTask(), EXAMPLES, a, CFG, progress=False)
    sample_candidates(model, tok, HashTask(), EXAMPLES, b, replace(CFG, batch_size=5), progress=False)
    sample_candidates(model, tok, HashTask(), EXAMPLES[::2], c, replace(CFG, batch_size=1), progress=False)
    assert same_candidates(by_id(a), by_id(b))
    assert same_candidates({i: g for i, g in by_id(a).items() if i in by_id(c)}, by_id(c))
    d = tmp_path / "d.jsonl"
    sample_candidates(model, tok, HashTask(), EXAMPLES, d, replace(CFG, seed=1), progress=False)
    assert not same_candidates(by_id(d), by_id(a))  # the seed does matter


def test_resume_mismatch_raises_and_leaves_file(model, tok, tmp_path):
    out = tmp_path / "cands.jsonl"
    sample_candidates(model, tok, HashTask(), EXAMPLES[:2], out, CFG, model_name="m", progress=False)
    with open(out, "ab") as f:
        f.write(b'{"id": "torn')  # even a torn tail must survive a refused run
    snapshot, meta_snapshot = out.read_bytes(), meta_path_for(out).read_bytes()

    class OtherTask(HashTask):
        name = "other"

    cases = [
        (dict(task=OtherTask()), "task"),
        (dict(cfg=SamplingConfig(k=5, max_new_tokens=10, temperature=1.0, batch_size=2)), "sampling.k"),
        (dict(cfg=SamplingConfig(k=4, max_new_tokens=10, temperature=0.5, batch_size=2)), "sampling.temperature"),
        (dict(tokenizer=char_tokenizer(extra="ABC")), "tokenizer.vocab_size"),
        (dict(model_name="other-model"), "model"),
    ]
    for change, field in cases:
        kw = dict(
            model=model,
            tokenizer=tok,
            task=HashTask(),
            examples=EXAMPLES,
            out_path=out,
            cfg=CFG,
            model_name="m",
            progress=False,
        )
        kw.update(change)
        with pytest.raises(InputError) as err:
            sample_candidates(**kw)
        assert err.value.field == field and str(meta_path_for(out)) in str(err.value)
        assert out.read_bytes() == snapshot and meta_path_for(out).read_bytes() == meta_snapshot

    # batch size and seed may change on resume
    ok = sample_candidates(
        model,
        tok,
        HashTask(),
        EXAMPLES[:3],
        out,
        SamplingConfig(k=4, max_new_tokens=10, temperature=1.0, batch_size=1, seed=9),
        model_name="m",
        progress=False,
    )
    assert ok["questions"] == 3


def test_existing_data_without_meta_is_refused(model, tok, tmp_path):
    out = tmp_path / "cands.jsonl"
    out.write_text('{"id": "q0"}\n')
    with pytest.raises(InputError, match="meta.json"):
        sample_candidates(model, tok, HashTask(), EXAMPLES[:1], out, CFG, progress=False)
    assert out.read_text() == '{"id": "q0"}\n'


def test_duplicate_example_ids_rejected(model, tok, tmp_path):
    with pytest.raises(InputError, match="duplicate"):
        sample_candidates(
            model, tok, HashTask(), [EXAMPLES[0], EXAMPLES[0]], tmp_path / "c.jsonl", CFG, progress=False
        )


def good_group(**over) -> dict:
    g = {
        "id": "a",
        "task": "hash",
        "prompt": "p",
        "reference": "r",
        "answer": "1",
        "candidates": [{"text": "t", "answer": "1", "correct": True, "rank": 0, "score": -0.5}],
        "meta": {"k": 1},
    }
    g.update(over)
    return g


@pytest.mark.parametrize(
    "bad, line, field",
    [
        ({"prompt": None}, 2, "prompt"),
        ({"candidates": "x"}, 2, "candidates"),
        ({"candidates": [{"text": "t"}]}, 2, "candidates[0].correct"),
        ({"candidates": [{"text": 3, "correct": True}]}, 2, "candidates[0].text"),
        ({"candidates": [{"text": "t", "correct": True, "rank": "0"}]}, 2, "candidates[0].rank"),
        ({"candidates": [{"text": "t", "correct": True, "score": "high"}]}, 2, "candidates[0].score"),
        ({"id": "a"}, 2, "id"),  # duplicate id
    ],
)
def test_read_groups_errors_name_file_line_field(tmp_path, bad, line, field):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(good_group()) + "\n" + json.dumps(good_group(**bad)) + "\n")
    with pytest.raises(InputError) as err:
        read_groups(path)
    assert err.value.line == line and err.value.field == field and str(path) in str(err.value)


def test_read_groups_roundtrip_and_missing_file(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(good_group()) + "\n\n" + json.dumps(good_group(id="b")) + "\n")
    gs = read_groups(path)
    assert [g.id for g in gs] == ["a", "b"] and gs[0].candidates[0].score == -0.5 and gs[0].meta == {"k": 1}
    with pytest.raises(InputError, match="does not exist"):
        read_groups(tmp_path / "missing.jsonl")
