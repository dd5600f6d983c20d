"""Merge the per-shard candidates files of `aftune sample --shard i/n` into one file `aftune align` reads.

Shard i of n samples questions i, i+n, i+2n, ... of the split into OUT.shard{i}of{n}.jsonl (with its own
meta sidecar, and resumes on its own). merge_shards checks that the shards belong together (same task,
model, tokenizer and sampling settings, all complete, none missing) and writes every question once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from aftune.io import InputError, write_jsonl
from aftune.records import CandidatesMeta, Group, meta_path_for, read_groups
from aftune.sampling.store import group_stats

_SHARD_RE = re.compile(r"\.shard(\d+)of(\d+)$")


def shard_file(out: str | os.PathLike, i: int, n: int) -> Path:
    """The file shard i of n writes for --out OUT (same naming as `aftune sample --shard i/n`)."""
    p = Path(out)
    return p.with_name(f"{p.stem}.shard{i}of{n}{p.suffix}")


def _read_meta(path: Path) -> CandidatesMeta:
    mp = meta_path_for(path)
    if not mp.exists():
        raise InputError(f"has no {mp.name}; only files written by `aftune sample` can be merged", path)
    return CandidatesMeta.read(mp)


def _check_shard_names(paths: list[Path]) -> int | None:
    """If every name is X.shard{i}of{n}.jsonl: one n, every i in [0, n) exactly once. Returns n."""
    parsed = [_SHARD_RE.search(p.stem) for p in paths]
    if not all(parsed):
        return None
    ns = {int(m.group(2)) for m in parsed}
    if len(ns) != 1:
        raise InputError(f"shards of different splits (of {sorted(ns)}) cannot be merged: they overlap")
    n = ns.pop()
    idx = [int(m.group(1)) for m in parsed]
    missing = sorted(set(range(n)) - set(idx))
    if missing:
        raise InputError(
            f"missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}: run "
            f"`aftune sample --shard i/{n}` for them first",
            paths[0],
        )
    return n


def merge_shards(
    paths: list[str | os.PathLike], out: str | os.PathLike, require_complete: bool = True
) -> dict[str, Any]:
    """Merge shard files into `out` (JSONL + meta sidecar, each written atomically). Every question appears
    once: a group present in two inputs with identical content is kept once; with different content it is
    an error. Returns the merged file's stats."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    if not paths:
        raise InputError("no shard files to merge")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise InputError("the same shard file is given twice")
    if out.resolve() in resolved:
        raise InputError("the output is one of the shard files", out)
    for p in paths:
        if not p.exists():
            raise InputError("file does not exist", p)
    n = _check_shard_names(paths)
    metas = [_read_meta(p) for p in paths]
    first = metas[0]
    for p, meta in zip(paths, metas):
        if require_complete and meta.status != "complete":
            raise InputError(
                f"shard is not complete (status {meta.status!r}); rerun its `aftune sample` "
                "command to finish it (it resumes)",
                p,
            )
        for key, value, ref_value in meta.mismatches(first)[:1]:
            raise InputError(
                f"{key}={value!r} but {paths[0].name} has {ref_value!r}; shards must come from "
                "one sampling configuration",
                meta_path_for(p),
                field=key,
            )

    merged: list[dict[str, Any]] = []
    where: dict[str, tuple[Path, dict]] = {}
    dropped = 0
    for p in paths:
        for g in read_groups(p):
            if g.task != first.task:
                raise InputError(
                    f"group {g.id!r} is for task {g.task!r}, the meta says {first.task!r}", p, field="task"
                )
            d = g.to_dict()
            if g.id in where:
                if where[g.id][1] != d:
                    raise InputError(f"question {g.id!r} is also in {where[g.id][0]} with different candidates", p)
                dropped += 1
                continue
            where[g.id] = (p, d)
            merged.append(d)

    stats = group_stats([Group.from_dict(d) for d in merged])
    stats.update({"shards": len(paths), "duplicates_dropped": dropped})
    write_jsonl(out, merged)
    CandidatesMeta(
        task=first.task,
        model=first.model,
        tokenizer=first.tokenizer,
        sampling=first.sampling,
        prompt_format=first.prompt_format,
        engine=first.engine,
        status="complete",
        stats=stats,
        merged_from=[p.name for p in paths],
        n_shards=n,
    ).write(meta_path_for(out))
    return stats
