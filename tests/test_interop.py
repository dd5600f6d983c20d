"""Data in and out of TRL (docs/trl-interop.md): `aftune export` writes datasets TRL's trainers read as they
are, `aftune import` turns TRL-style labelled data into candidates that `aftune align` trains on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TASK_ARGS, cli, snapshot
from datasets import Dataset, load_dataset

from aftune.interop import all_pairs, from_pairwise, to_pairwise, to_unpaired
from aftune.io import InputError
from aftune.records import Candidate, CandidatesMeta, Group, meta_path_for, read_groups


def _load(out: Path) -> Dataset:
    return load_dataset("parquet", data_files=str(out / "train.parquet"), split="train")


def _triples(groups: list[Group]) -> Counter:
    return Counter((g.prompt, c.text, c.correct) for g in groups for c in g.candidates)


def _rows_triples(rows) -> Counter:
    return Counter((r["prompt"], r["completion"], r["label"]) for r in rows)


def _export(cands: Path, out: Path, fmt: str, *extra: str) -> dict:
    r = cli("export", "--candidates", cands, "--format", fmt, "--out", out, *extra)
    assert r.code == 0, r.stderr
    return json.loads((out / "meta.json").read_text())


def _group(gid: str, n_pos: int, n_neg: int, reference: str = "") -> Group:
    cands = [Candidate(f"{gid} right {i}", "1", True) for i in range(n_pos)]
    cands += [Candidate(f"{gid} wrong {i}", "2", False) for i in range(n_neg)]
    return Group(
        id=gid, task="arith", prompt=f"Question: {gid}?\nAnswer:\n", reference=reference, answer="1", candidates=cands
    )


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("reference", [True, False])
def test_unpaired_round_trip_keeps_every_labelled_completion(candidates, tmp_path, reference):
    groups = read_groups(candidates)
    flag = "--include-reference" if reference else "--no-include-reference"
    meta = _export(candidates, tmp_path / "trl", "unpaired", flag)
    ds = _load(tmp_path / "trl")
    assert ds.column_names == ["prompt", "completion", "label"]
    assert ds.features["label"].dtype == "bool"
    expected = _rows_triples(to_unpaired(groups, include_reference=reference))
    assert _rows_triples(ds) == expected
    n_refs = len(groups) if reference else 0  # the tiny model never writes the reference itself
    assert meta["rows"] == len(ds) == sum(len(g.candidates) for g in groups) + n_refs
    assert meta["sources"][0]["path"] == str(candidates) and meta["sources"][0]["task"] == "arith"

    r = cli("import", "--dataset", tmp_path / "trl", "--out", tmp_path / "imp.jsonl", "--task", "arith")
    assert r.code == 0, r.stderr
    imported = read_groups(tmp_path / "imp.jsonl")
    assert _triples(imported) == expected
    assert _triples(imported) == _triples(groups) + (
        Counter({(g.prompt, g.reference, True): 1 for g in groups}) if reference else Counter()
    )
    assert {g.prompt for g in imported} == {g.prompt for g in groups}
    assert all(g.task == "arith" and g.reference == "" and g.answer == "" for g in imported)
    side = CandidatesMeta.read(meta_path_for(tmp_path / "imp.jsonl"))
    assert (side.task, side.model, side.status) == ("arith", "", "complete")
    assert side.stats["questions"] == len(imported) and side.stats["rows"] == len(ds)
    assert side.stats["format"] == "unpaired" and "aftune import" in side.stats["note"]


def test_grouped_round_trip_is_lossless(candidates, tmp_path):
    groups = read_groups(candidates)
    groups[0].meta["derived_from"] = "x.jsonl"  # a free-form meta key only one group has
    groups[1].candidates[0].score = -2  # an int score reads back as the equal float
    meta = _export(_write_jsonl(tmp_path / "c.jsonl", [g.to_dict() for g in groups]), tmp_path / "g", "grouped")
    assert meta["rows"] == len(groups) and meta["trl_trainer"] is None
    r = cli("import", "--dataset", tmp_path / "g" / "train.parquet", "--out", tmp_path / "back.jsonl")
    assert r.code == 0, r.stderr
    assert read_groups(tmp_path / "back.jsonl") == groups


def test_pairwise_import_deduplicates_per_prompt(candidates, tmp_path):
    groups = read_groups(candidates)
    meta = _export(candidates, tmp_path / "dpo", "pairwise")
    assert meta["rows"] == sum(len(all_pairs(g)) for g in groups) == meta["all_pairs"]
    r = cli("import", "--dataset", tmp_path / "dpo", "--out", tmp_path / "imp.jsonl", "--task", "arith")
    assert r.code == 0, r.stderr
    imported = read_groups(tmp_path / "imp.jsonl")
    mixed = [g for g in groups if all_pairs(g)]
    assert len(imported) == len(mixed)
    # every distinct (prompt, text) once: each reference was chosen k times, each wrong sample rejected once
    assert _triples(imported) == Counter(set(_rows_triples(to_unpaired(mixed))))


def test_from_pairwise_labels_and_order():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "c", "rejected": "d"},
        {"prompt": "p", "chosen": "a", "rejected": "e"},
        {"prompt": "p", "chosen": "f", "rejected": "b"},
    ]
    groups = from_pairwise(rows, task="arith")
    assert [(g.id, g.prompt, g.task, g.reference) for g in groups] == [
        ("0", "p", "arith", ""),
        ("1", "q", "arith", ""),
    ]
    assert [(c.text, c.correct) for c in groups[0].candidates] == [
        ("a", True),
        ("b", False),
        ("e", False),
        ("f", True),
    ]
    with pytest.raises(InputError) as e:
        from_pairwise(rows + [{"prompt": "q", "chosen": "d", "rejected": "x"}], source="mem")
    assert str(e.value) == (
        "mem: row 5: field 'chosen': this completion is also 'rejected' for this prompt (row 2); "
        "binary labels cannot say it is both right and wrong"
    )


# --------------------------------------------------------------------------- pairs


def test_all_pairs_is_every_correct_wrong_combination():
    groups = [_group("a", 2, 3), _group("b", 1, 1), _group("c", 3, 0), _group("d", 0, 2), _group("e", 2, 2, "ref")]
    rows = to_pairwise(groups)
    per_prompt = Counter(r["prompt"] for r in rows)
    assert [per_prompt[g.prompt] for g in groups] == [6, 1, 0, 0, 6]  # e: the reference is a third positive
    for g in groups:
        pos = {c.text for c in g.candidates if c.correct} | ({g.reference} if g.reference else set())
        neg = {c.text for c in g.candidates if not c.correct}
        got = [(r["chosen"], r["rejected"]) for r in rows if r["prompt"] == g.prompt]
        assert len(set(got)) == len(got) == len(pos) * len(neg)
        assert set(got) == {(p, n) for p in pos for n in neg}
    assert len(to_pairwise(groups, include_reference=False)) == 6 + 1 + 4


def test_capped_pairs_are_a_seeded_sample():
    groups = [_group("a", 4, 5), _group("b", 1, 2), _group("c", 3, 3, "ref")]
    full = {g.prompt: {(r["chosen"], r["rejected"]) for r in to_pairwise([g])} for g in groups}
    capped = to_pairwise(groups, max_pairs=3, seed=7)
    assert capped == to_pairwise(groups, max_pairs=3, seed=7)  # deterministic per seed
    assert Counter(r["prompt"] for r in capped) == {groups[0].prompt: 3, groups[1].prompt: 2, groups[2].prompt: 3}
    for r in capped:
        assert (r["chosen"], r["rejected"]) in full[r["prompt"]]
    assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in capped}) == len(capped)  # without replacement
    # a question's sample does not depend on the other questions, and other seeds draw other samples
    assert [r for r in capped if r["prompt"] == groups[0].prompt] == to_pairwise(groups[:1], max_pairs=3, seed=7)
    samples = {json.dumps(to_pairwise(groups[:1], max_pairs=3, seed=s)) for s in range(6)}
    assert len(samples) > 1
    with pytest.raises(InputError, match="must be >= 1, got 0"):
        to_pairwise(groups, max_pairs=0)


def test_export_pairwise_cap_through_the_cli(candidates, tmp_path):
    groups = read_groups(candidates)
    meta = _export(candidates, tmp_path / "a", "pairwise", "--max-pairs-per-question", "2", "--seed", "3")
    _export(candidates, tmp_path / "b", "pairwise", "--max-pairs-per-question", "2", "--seed", "3")
    assert meta["rows"] == sum(min(2, len(all_pairs(g))) for g in groups) < meta["all_pairs"]
    assert (meta["max_pairs_per_question"], meta["seed"], meta["trl_trainer"]) == (2, 3, "DPOTrainer")
    assert _load(tmp_path / "a").to_list() == _load(tmp_path / "b").to_list()
    assert _load(tmp_path / "a").to_list() == to_pairwise(groups, max_pairs=2, seed=3)
    assert "DPOTrainer" in (tmp_path / "a" / "README.md").read_text()


# --------------------------------------------------------------------------- TRL reads the exports


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _changed(model, start) -> bool:
    return any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters())


def _trl_run(trainer_cls, config_cls, tiny_model, ds, out: Path):
    from aftune.modeling import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = config_cls(
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        max_length=96,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 1
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert loss and all(torch.isfinite(torch.tensor(v)) for v in loss)
    assert _changed(model, start)


def test_trl_kto_trainer_trains_on_the_unpaired_export(tiny_model, candidates, tmp_path, one_thread):
    from trl import KTOConfig, KTOTrainer

    _export(candidates, tmp_path / "kto", "unpaired")
    ds = _load(tmp_path / "kto")
    assert set(ds["label"]) == {True, False}
    _trl_run(KTOTrainer, KTOConfig, tiny_model, ds, tmp_path / "run")


def test_trl_dpo_trainer_trains_on_the_pairwise_export(tiny_model, candidates, tmp_path, one_thread):
    from trl import DPOConfig, DPOTrainer

    _export(candidates, tmp_path / "dpo", "pairwise", "--max-pairs-per-question", "2")
    _trl_run(DPOTrainer, DPOConfig, tiny_model, _load(tmp_path / "dpo"), tmp_path / "run")


# --------------------------------------------------------------------------- import -> align


def test_imported_labels_train_with_aftune_align(tiny_model, candidates, tmp_path):
    # labels made elsewhere: TRL's unpaired rows, written as a plain dataset file
    rows = to_unpaired(read_groups(candidates))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "labelled.parquet"))
    r = cli("import", "--dataset", tmp_path / "labelled.parquet", "--out", tmp_path / "imp.jsonl", "--task", "arith")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["questions"] == len(read_groups(candidates))
    align = [
        "align",
        "--model",
        tiny_model,
        "--candidates",
        tmp_path / "imp.jsonl",
        "--task",
        "arith",
        "--task-args",
        TASK_ARGS,
        "--method",
        "bc",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--quiet",
        "--out",
        tmp_path / "bc",
    ]
    r = cli(*align)
    assert r.code == 0, r.stderr
    metrics = json.loads((tmp_path / "bc" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["n_groups"] == len(read_groups(candidates))
    assert (tmp_path / "bc" / "model" / "config.json").exists()

    # without --task the groups are 'custom', and align says so
    r = cli("import", "--dataset", tmp_path / "labelled.parquet", "--out", tmp_path / "custom.jsonl")
    assert r.code == 0, r.stderr
    r = cli(*[str(a).replace(str(tmp_path / "imp.jsonl"), str(tmp_path / "custom.jsonl")) for a in align])
    assert r.error_lines == [
        f"error: {tmp_path / 'custom.jsonl'}: line 1: field 'task': candidates are for task "
        f"'custom', but --task is 'arith'"
    ]


# --------------------------------------------------------------------------- bad input


def _parquet(path: Path, rows: list) -> Path:
    Dataset.from_list(rows).to_parquet(str(path))
    return path


ROW = {"prompt": "Question: 1?\nAnswer:\n", "completion": "#### 1", "label": True}
PAIR = {"prompt": "Question: 1?\nAnswer:\n", "chosen": "#### 1", "rejected": "#### 2"}
CONV = "conversational rows (lists of messages) need a chat template; give {} as text"
MESSAGES = [{"role": "user", "content": "1?"}]
BAD_GROUP = {
    "id": 1,
    "task": "arith",
    "prompt": "p",
    "reference": "",
    "answer": "1",
    "candidates": [{"text": "x", "correct": 1}],
}


def _jsonl(*rows, name: str = "d.jsonl"):
    return lambda t: _write_jsonl(t / name, list(rows))


def _pq(*rows):
    return lambda t: _parquet(t / "d.parquet", list(rows))


BAD_IMPORTS = {  # case: (make the dataset in tmp_path, the error line after "error: " with {F} for its path)
    "label not a bool (JSONL)": (
        _jsonl(ROW, {**ROW, "label": "yes"}),
        "{F}: line 2: field 'label': expected bool, got str",
    ),
    "label not a bool (Parquet)": (
        _pq({**ROW, "label": "1"}, {**ROW, "label": "0"}),
        "{F}: row 1: field 'label': expected bool, got str",
    ),
    "null completion (Parquet)": (
        _pq(ROW, ROW, {**ROW, "completion": None}),
        "{F}: row 3: field 'completion': expected str, got NoneType",
    ),
    "missing field": (_jsonl(ROW, {"prompt": "p", "completion": "c"}), "{F}: line 2: field 'label': missing field"),
    "conversational prompt": (
        _jsonl({**ROW, "prompt": MESSAGES}),
        "{F}: line 1: field 'prompt': " + CONV.format("prompt"),
    ),
    "no known columns": (
        _jsonl({"question": "q", "text": "t"}),
        "{F}: expected TRL's unpaired format (prompt, completion, label), its preference format "
        "(prompt, chosen, rejected) or aftune's grouped records; got columns ['question', 'text']",
    ),
    "chosen and rejected": (
        _jsonl(PAIR, {**PAIR, "chosen": "#### 3", "rejected": "#### 1"}),
        "{F}: line 2: field 'rejected': this completion is also 'chosen' for this prompt "
        "(line 1); binary labels cannot say it is both right and wrong",
    ),
    "preference without prompt": (
        _jsonl({"chosen": "a", "rejected": "b"}),
        "{F}: line 1: field 'prompt': missing field",
    ),
    "empty dataset": (_jsonl(), "{F}: no rows"),
    "does not exist": (lambda t: t / "nothing.parquet", "{F}: file does not exist"),
    "not a data file": (_jsonl(ROW, name="d.csv"), "{F}: expected a .parquet or .jsonl file (or a folder of them)"),
    "not Parquet": (_jsonl(ROW, name="d.parquet"), None),  # pyarrow's own words follow
    "grouped row": (_jsonl(BAD_GROUP), "{F}: line 1: field 'candidates[0].correct': expected bool, got int"),
}


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_bad_import_is_one_error_line_and_writes_nothing(case, tmp_path):
    make, expected = BAD_IMPORTS[case]
    data = make(tmp_path)
    out = tmp_path / "out.jsonl"
    out.write_text("kept\n")
    before = snapshot(out)
    r = cli("import", "--dataset", data, "--out", out, "--task", "arith")
    assert r.code == 2 and len(r.error_lines) == 1, r.stderr
    if expected is None:
        assert r.error_lines[0].startswith(f"error: {data}: not a readable Parquet file (")
    else:
        assert r.error_lines == ["error: " + expected.format(F=data)]
    assert snapshot(out) == before and not meta_path_for(out).exists()


def test_bad_export_flags(candidates, tmp_path):
    out = tmp_path / "x"
    cases = {
        ("--format", "kto"): "error: field '--format': expected unpaired, pairwise or grouped, got 'kto'",
        ("--format", "pairwise", "--max-pairs-per-question", "0"): "error: field '--max-pairs-per-question': "
        "must be >= 1, got 0",
        ("--format", "unpaired", "--max-pairs-per-question", "3"): "error: field '--max-pairs-per-question': "
        "only the pairwise format has pairs to cap",
    }
    for extra, line in cases.items():
        r = cli("export", "--candidates", candidates, "--out", out, *extra)
        assert (r.code, r.error_lines) == (2, [line]), r.stderr
    missing = tmp_path / "none.jsonl"
    r = cli("export", "--candidates", f"{candidates},{missing}", "--out", out)
    assert (r.code, r.error_lines) == (2, [f"error: {missing}: file does not exist"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = cli("export", "--candidates", empty, "--out", out)
    assert (r.code, r.error_lines) == (2, [f"error: {empty}: no candidate groups (empty file)"])
    assert not out.exists()  # every input is checked before anything is written


def test_import_of_a_hub_folder_reads_its_train_files(tmp_path):
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    _parquet(data / "train-00000-of-00002.parquet", [ROW, {**ROW, "completion": "#### 2", "label": False}])
    _parquet(data / "train-00001-of-00002.parquet", [{**ROW, "prompt": "Question: 2?\nAnswer:\n"}])
    _parquet(data / "test-00000-of-00001.parquet", [{**ROW, "prompt": "Question: held out?\nAnswer:\n"}])
    r = cli("import", "--dataset", tmp_path / "hub", "--out", tmp_path / "imp.jsonl", "--task", "arith")
    assert r.code == 0, r.stderr
    groups = read_groups(tmp_path / "imp.jsonl")
    assert [(g.prompt, [(c.text, c.correct) for c in g.candidates]) for g in groups] == [
        (ROW["prompt"], [("#### 1", True), ("#### 2", False)]),
        ("Question: 2?\nAnswer:\n", [("#### 1", True)]),
    ]
    side = CandidatesMeta.read(meta_path_for(tmp_path / "imp.jsonl"))
    assert side.stats["imported_from"] == [str(p) for p in sorted(data.glob("train-*"))]


def test_import_without_a_dataset(tmp_path):
    r = cli("import", "--out", tmp_path / "imp.jsonl")
    assert (r.code, r.error_lines) == (
        2,
        ["error: field '--dataset': give the dataset to import (a .parquet or .jsonl file, or a folder)"],
    )


def test_doc_lists_every_flag_and_error():
    from aftune.cli import app

    doc = (Path(__file__).resolve().parents[1] / "docs" / "trl-interop.md").read_text()
    for name in ("export", "import"):
        for p in app.commands[name].params:
            for flag in p.opts:
                assert flag in doc or flag == "--config", (name, flag)
    for case, (_, expected) in BAD_IMPORTS.items():
        assert (expected or "{F}: not a readable Parquet file (").split("{F}: ", 1)[1] in doc, case


def test_export_of_several_files(candidates, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(candidates.read_text())
    meta = _export(Path(f"{candidates},{other}"), tmp_path / "two", "unpaired", "--no-include-reference")
    n = sum(len(g.candidates) for g in read_groups(candidates))
    assert meta["rows"] == len(_load(tmp_path / "two")) == 2 * n
    assert [s["path"] for s in meta["sources"]] == [str(candidates), str(other)]
    assert meta["sources"][1].get("task") is None  # no sidecar: nothing claimed about where it came from


def test_docstring_examples_run():
    import doctest

    import aftune.interop

    result = doctest.testmod(aftune.interop)
    assert result.attempted >= 10 and result.failed == 0


def test_chat_sampled_candidates_export_as_conversational_rows(tmp_path):
    """Candidates sampled with a chat template (`meta.messages` holds the user turn) become TRL's conversational
    format: a user-message prompt and assistant-message completions, which TRL renders with its own template."""
    import datasets

    from aftune.interop import export_groups, to_pairwise, to_unpaired
    from aftune.records import Candidate, Group

    user = [{"role": "user", "content": "Question: 2+3?\nAnswer:"}]
    g = Group(
        "q1",
        "arith",
        "<bos>[user]Question: 2+3?\nAnswer:<eot>\n[assistant]",
        "2+3=5\n#### 5",
        "5",
        [Candidate("2+3=6\n#### 6", "6", False)],
        meta={"messages": user},
    )
    rows = to_unpaired([g])
    assert rows[0] == {
        "prompt": user,
        "completion": [{"role": "assistant", "content": "2+3=5\n#### 5"}],
        "label": True,
    }
    (pair,) = to_pairwise([g])
    assert pair["rejected"] == [{"role": "assistant", "content": "2+3=6\n#### 6"}]
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps(g.to_dict()) + "\n")
    meta = export_groups({str(src): [g]}, "unpaired", tmp_path / "out")
    assert meta["conversational"] is True
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "train.parquet"), split="train")
    assert ds[0]["prompt"] == user and ds[1]["completion"][0]["role"] == "assistant"
    plain = Group("q2", "arith", "Q", "r", "5", [Candidate("x", None, False)])
    with pytest.raises(InputError, match="some candidates were sampled with a chat template"):
        export_groups({str(src): [g, plain]}, "unpaired", tmp_path / "mixed")
