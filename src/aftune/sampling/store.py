"""The resumable `aftune sample` step: k labelled candidates per training question, one Group per line.

The output file only ever grows: each batch of finished questions is appended (and fsynced) as a unit,
so a killed run loses at most the batch in flight. On restart a torn last line is cut, the ids already
written are skipped, and a sidecar `<out>.meta.json` guards against mixing candidates from different
tasks, tokenizers or sampling settings in one file.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Callable, Any

from tqdm.auto import tqdm

from aftune.io import (InputError, append_jsonl, atomic_write_json, iter_jsonl, read_json_object, require,
                       truncate_torn_tail)
from aftune.records import Candidate, Example, Group
from aftune.sampling.sampler import Sample, SamplingConfig, generate_k

# Settings that change which candidates are drawn: a resumed run must match them exactly.
# batch_size and seed may change between runs (they only change which random draws are made).
_CHECKED_SAMPLING = ("k", "temperature", "top_p", "max_new_tokens", "stop")


def meta_path_for(out_path: str | os.PathLike) -> Path:
    return Path(str(out_path) + ".meta.json")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def _tokenizer_info(tokenizer) -> dict[str, Any]:
    return {"name": str(getattr(tokenizer, "name_or_path", "") or ""), "vocab_size": len(tokenizer)}


def _check_meta(meta_path: Path, old: dict, new: dict) -> None:
    def fail(name: str, was: Any, now: Any) -> None:
        raise InputError(f"this file was sampled with {name}={was!r} but this run uses {now!r}; "
                         "use a new output path (or delete the old file) instead of mixing them",
                         meta_path, field=name)

    if old.get("task") != new["task"]:
        fail("task", old.get("task"), new["task"])
    if old.get("model") and new["model"] and old["model"] != new["model"]:
        fail("model", old["model"], new["model"])
    old_tok = old.get("tokenizer") or {}
    for key in ("name", "vocab_size"):
        if old_tok.get(key) != new["tokenizer"][key]:
            fail(f"tokenizer.{key}", old_tok.get(key), new["tokenizer"][key])
    old_s = old.get("sampling") or {}
    for key in _CHECKED_SAMPLING:
        was, now = old_s.get(key), new["sampling"][key]
        if key == "stop" and was is not None:
            was = list(was)
        if was != now:
            fail(f"sampling.{key}", was, now)


def _done_ids(out_path: Path) -> set[str]:
    ids: set[str] = set()
    if not out_path.exists():
        return ids
    for line, obj in iter_jsonl(out_path):
        gid = str(require(obj, "id", (str, int), out_path, line))
        if gid in ids:
            raise InputError(f"duplicate group id {gid!r}", out_path, line, "id")
        ids.add(gid)
    return ids


def dedupe_samples(samples: list[Sample]) -> tuple[list[Sample], int]:
    """Drop exact duplicates after whitespace normalisation, keeping the first; returns (kept, n_dropped)."""
    seen: set[str] = set()
    kept = []
    for s in samples:
        key = normalize_whitespace(s.text)
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept, len(samples) - len(kept)


def build_group(task, example: Example, prompt: str, samples: list[Sample], k: int) -> Group:
    """Label the deduplicated samples of one question and rank them."""
    from aftune.tasks.feedback import assign_ranks  # written alongside; imported late on purpose

    kept, n_dup = dedupe_samples(samples)
    candidates = [Candidate(text=s.text, answer=task.extract_answer(s.text), correct=task.is_correct(s.text, example),
                            wrong_steps=task.wrong_steps(s.text), score=s.score) for s in kept]
    assign_ranks(candidates)
    return Group(id=example.id, task=task.name, prompt=prompt, reference=example.reference, answer=example.answer,
                 candidates=candidates, meta={"k": k, "n_duplicates": n_dup})


def group_stats(groups: list[Group]) -> dict[str, Any]:
    n_q = len(groups)
    n_c = sum(len(g.candidates) for g in groups)
    n_pos = sum(g.n_positive for g in groups)
    return {
        "questions": n_q,
        "candidates": n_c,
        "frac_correct": n_pos / n_c if n_c else 0.0,
        # candidates are already deduplicated, so every positive is a distinct correct solution
        "distinct_correct_per_question": n_pos / n_q if n_q else 0.0,
        "frac_mixed": sum(g.mixed for g in groups) / n_q if n_q else 0.0,
        "frac_any_correct": sum(g.n_positive > 0 for g in groups) / n_q if n_q else 0.0,
    }


def sample_candidates(model, tokenizer, task, examples: list[Example], out_path: str | os.PathLike,
                      cfg: SamplingConfig, model_name: str = "", progress: bool = True,
                      generate: Callable[[list[str], SamplingConfig], list[list[Sample]]] | None = None) -> dict[str, Any]:
    """Sample, label and append one Group per example to `out_path` (JSONL), resuming a partial file.

    Questions are processed in order of prompt length (less padding), so the file's line order is not the
    input order; match groups by id. Returns the stats that are also stored in the meta sidecar.
    """
    out_path = Path(out_path)
    meta_path = meta_path_for(out_path)
    seen_ids: set[str] = set()
    for ex in examples:
        if ex.id in seen_ids:
            raise InputError(f"duplicate example id {ex.id!r} in the input", field="id")
        seen_ids.add(ex.id)

    meta: dict[str, Any] = {"task": task.name, "model": model_name, "tokenizer": _tokenizer_info(tokenizer),
                            "sampling": cfg.to_dict()}
    has_data = out_path.exists() and out_path.stat().st_size > 0
    if has_data and meta_path.exists():
        old = read_json_object(meta_path)
        _check_meta(meta_path, old, meta)  # before touching the data file: a mismatch leaves it as it was
    elif has_data:
        raise InputError(f"has candidates but no {meta_path.name} to check them against; refusing to append "
                         "samples of unknown origin (use a new output path)", out_path)

    truncate_torn_tail(out_path)
    done = _done_ids(out_path)
    todo = [ex for ex in examples if ex.id not in done]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, {**meta, "status": "running"})

    prompts = {ex.id: task.prompt(ex) for ex in todo}
    lengths = {ex.id: len(ids) for ex, ids in zip(todo, tokenizer([prompts[ex.id] for ex in todo])["input_ids"])} \
        if todo else {}
    todo.sort(key=lambda ex: -lengths[ex.id])  # stable: equal lengths keep input order
    t0 = time.perf_counter()
    n_samples = 0
    with tqdm(total=len(todo), desc=f"sampling {task.name}", unit="q", disable=not progress) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            # A seed per batch keyed by its first question: distinct streams per batch, reproducible reruns.
            seed = zlib.crc32(f"{cfg.seed}:{batch[0].id}".encode())
            batch_prompts, batch_cfg = [prompts[ex.id] for ex in batch], replace(cfg, seed=seed)
            # `generate` swaps the engine (e.g. vLLM); labelling, resume and the file format stay the same
            samples = (generate(batch_prompts, batch_cfg) if generate is not None
                       else generate_k(model, tokenizer, batch_prompts, batch_cfg))
            groups = [build_group(task, ex, prompts[ex.id], s, cfg.k) for ex, s in zip(batch, samples)]
            append_jsonl(out_path, [g.to_dict() for g in groups])
            n_samples += sum(len(s) for s in samples)
            bar.update(len(batch))
    wall = time.perf_counter() - t0

    stats = group_stats(read_groups(out_path)) if out_path.exists() else group_stats([])
    stats.update({"new_questions": len(todo), "resumed_questions": len(done), "new_samples": n_samples,
                  "wall_s": round(wall, 3), "samples_per_s": n_samples / wall if wall > 0 else 0.0})
    atomic_write_json(meta_path, {**meta, "status": "complete", "stats": stats})
    return stats


def _check_candidate(c: Any, path: Path, line: int, where: str) -> None:
    if not isinstance(c, dict):
        raise InputError("expected a JSON object", path, line, where)

    def opt(name: str, types: tuple[type, ...]) -> None:
        if c.get(name) is not None and (not isinstance(c[name], types) or isinstance(c[name], bool) and bool not in types):
            raise InputError(f"expected {' or '.join(t.__name__ for t in types)} or null, got "
                             f"{type(c[name]).__name__}", path, line, f"{where}.{name}")

    for name, types in (("text", str), ("correct", bool)):
        if name not in c:
            raise InputError("missing field", path, line, f"{where}.{name}")
        if not isinstance(c[name], types):
            raise InputError(f"expected {types.__name__}, got {type(c[name]).__name__}", path, line, f"{where}.{name}")
    opt("answer", (str,))
    opt("rank", (int,))
    opt("wrong_steps", (int,))
    opt("score", (int, float))
    opt("is_reference", (bool,))


def read_groups(path: str | os.PathLike) -> list[Group]:
    """Read a candidates file; malformed records raise InputError naming the file, line and field."""
    path = Path(path)
    groups: list[Group] = []
    ids: set[str] = set()
    for line, obj in iter_jsonl(path):
        gid = require(obj, "id", (str, int), path, line)
        for name in ("task", "prompt", "reference"):
            require(obj, name, str, path, line)
        require(obj, "answer", (str, int), path, line)
        cands = require(obj, "candidates", list, path, line)
        if obj.get("meta") is not None and not isinstance(obj["meta"], dict):
            raise InputError(f"expected object, got {type(obj['meta']).__name__}", path, line, "meta")
        for i, c in enumerate(cands):
            _check_candidate(c, path, line, f"candidates[{i}]")
        if str(gid) in ids:
            raise InputError(f"duplicate group id {gid!r}", path, line, "id")
        ids.add(str(gid))
        groups.append(Group.from_dict(obj))
    return groups
