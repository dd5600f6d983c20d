"""Sharded sampling: each `aftune sample --shard i/n` resumes on its own after an interruption, and
merge_shards gives every question exactly once, refusing shards that do not belong together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aftune.commands.merge import run_merge
from aftune.config import MergeConfig
from aftune.io import InputError
from aftune.records import meta_path_for, read_groups
from aftune.sampling.shards import merge_shards, shard_file

torch.set_num_threads(1)
TASK_ARGS = "n_train=7,n_validation=2,n_test=2"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from aftune.config import parse_task_args
    from aftune.modeling import create_tiny
    from aftune.tasks import get_tasks

    task = get_tasks("arith", parse_task_args(TASK_ARGS))[0]
    texts = [task.prompt(e) + e.reference for e in task.load("train")]
    return create_tiny(
        tmp_path_factory.mktemp("m") / "model", texts, vocab_size=300, hidden_size=32, n_layers=1, n_heads=2
    )


def _sample(model, out, shard, **kw):
    from aftune.commands.sample import run_sample
    from aftune.config import SampleConfig

    return run_sample(
        SampleConfig(
            model=str(model),
            out=str(out),
            task="arith",
            task_args=TASK_ARGS,
            split="train",
            k=2,
            max_new_tokens=5,
            batch_size=1,
            quiet=True,
            shard=shard,
            **kw,
        )
    )


def _ids(path) -> list[str]:
    return [g.id for g in read_groups(path)]


@pytest.fixture(scope="module")
def shards(tiny_model, tmp_path_factory):
    """Shards 0/2 and 1/2 of 7 questions; shard 0 is interrupted after one question, then resumed."""
    import aftune.sampling.store as store
    from aftune.config import parse_task_args
    from aftune.tasks import get_tasks

    out = tmp_path_factory.mktemp("s") / "cands.jsonl"
    s0, s1 = shard_file(out, 0, 2), shard_file(out, 1, 2)
    real = store.append_jsonl
    calls = []

    def dies_on_second_append(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    store.append_jsonl = dies_on_second_append
    try:
        with pytest.raises(KeyboardInterrupt):
            _sample(tiny_model, out, "0/2")
    finally:
        store.append_jsonl = real
    interrupted = {"ids": _ids(s0), "status": json.loads(meta_path_for(s0).read_text())["status"]}
    first_line = s0.read_text().splitlines()[0]
    stats1 = _sample(tiny_model, out, "1/2")  # the other shard is independent of shard 0's state
    stats0 = _sample(tiny_model, out, "0/2")  # resumes
    all_ids = [e.id for e in get_tasks("arith", parse_task_args(TASK_ARGS))[0].load("train")]
    return dict(
        out=out,
        s0=s0,
        s1=s1,
        interrupted=interrupted,
        first_line=first_line,
        stats0=stats0,
        stats1=stats1,
        all_ids=all_ids,
    )


def test_each_shard_resumes_on_its_own(shards):
    s = shards
    assert s["interrupted"]["status"] == "running" and len(s["interrupted"]["ids"]) == 1
    assert (s["stats0"]["resumed_questions"], s["stats0"]["new_questions"]) == (1, 3)  # 4 questions: 0,2,4,6
    assert (s["stats1"]["resumed_questions"], s["stats1"]["new_questions"]) == (0, 3)  # 1,3,5
    assert s["s0"].read_text().splitlines()[0] == s["first_line"]  # the kept group was not redone
    assert sorted(_ids(s["s0"])) == sorted(s["all_ids"][0::2])
    assert sorted(_ids(s["s1"])) == sorted(s["all_ids"][1::2])


def test_merge_gives_every_question_once(shards, tmp_path):
    s = shards
    out = tmp_path / "merged.jsonl"
    stats = merge_shards([s["s0"], s["s1"]], out)
    ids = _ids(out)
    assert sorted(ids) == sorted(s["all_ids"]) and len(ids) == len(set(ids)) == 7
    assert stats["questions"] == 7 and stats["duplicates_dropped"] == 0
    meta = json.loads(meta_path_for(out).read_text())
    assert meta["status"] == "complete" and meta["task"] == "arith" and meta["n_shards"] == 2
    # `aftune merge --shards 2` merges OUT.shard{i}of2.jsonl into OUT
    run_merge(MergeConfig(out=str(s["out"]), shards=2))
    assert sorted(_ids(s["out"])) == sorted(s["all_ids"])


def test_merge_drops_identical_duplicates_and_rejects_conflicts(shards, tmp_path):
    s = shards
    copy = tmp_path / "copy.jsonl"
    shutil.copy(s["s0"], copy)
    shutil.copy(meta_path_for(s["s0"]), meta_path_for(copy))
    out = tmp_path / "merged.jsonl"
    stats = merge_shards([s["s0"], s["s1"], copy], out)
    assert stats["duplicates_dropped"] == 4 and sorted(_ids(out)) == sorted(s["all_ids"])

    before = out.read_bytes()
    lines = copy.read_text().splitlines()
    g = json.loads(lines[0])
    g["candidates"][0]["text"] += " changed"
    copy.write_text("\n".join([json.dumps(g)] + lines[1:]) + "\n")
    with pytest.raises(InputError, match="different candidates"):
        merge_shards([s["s0"], s["s1"], copy], out)
    assert out.read_bytes() == before  # a refused merge leaves the old output as it was


def test_merge_refuses_shards_that_do_not_belong_together(shards, tmp_path):
    s = shards
    with pytest.raises(InputError, match="missing shard"):
        merge_shards([s["s0"]], tmp_path / "m.jsonl")
    with pytest.raises(InputError, match="output is one of"):
        merge_shards([s["s0"], s["s1"]], s["s1"])
    # a shard sampled with other settings
    d = tmp_path / "other"
    d.mkdir()
    a, b = d / s["s0"].name, d / s["s1"].name
    for src, dst in ((s["s0"], a), (s["s1"], b)):
        shutil.copy(src, dst)
        shutil.copy(meta_path_for(src), meta_path_for(dst))
    meta = json.loads(meta_path_for(b).read_text())
    meta["sampling"]["temperature"] = 1.3
    meta_path_for(b).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="sampling.temperature"):
        merge_shards([a, b], tmp_path / "m.jsonl")
    meta["sampling"]["temperature"] = json.loads(meta_path_for(a).read_text())["sampling"]["temperature"]
    meta["status"] = "running"
    meta_path_for(b).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="not complete"):
        merge_shards([a, b], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_shard_file_matches_sample_naming():
    # the one naming rule `aftune sample --shard i/n` writes and `aftune merge --shards n` reads
    assert shard_file("runs/c.jsonl", 3, 8) == Path("runs/c.shard3of8.jsonl")
