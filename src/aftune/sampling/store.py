"""The resumable `aftune sample` step: k labelled candidates per training question, one Group per line.

The output file only ever grows: questions are appended (and fsynced) as they finish, so a killed run loses
only the questions in flight. Each question's k samples are drawn from its own seed (sampler.question_seed:
the run's seed and the question id), so a resumed, sharded or straight run writes the same candidates, and
the built-in sampler gets every question in one call (its continuous batching keeps the running batch full).
On restart a torn last line is cut, the ids already
written are skipped, and a sidecar `<out>.meta.json` guards against mixing candidates from different
tasks, tokenizers or sampling settings in one file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from aftune.io import InputError, append_jsonl, iter_jsonl, require, truncate_torn_tail, write_jsonl
from aftune.prompting import PLAIN, PromptFormat, encode_prompt
from aftune.records import Candidate, CandidatesMeta, Example, Group, meta_path_for, read_groups
from aftune.sampling.sampler import Sample, SamplingConfig, generate_k, question_seed
from aftune.tasks.feedback import assign_ranks


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def tokenizer_info(tokenizer) -> dict[str, Any]:
    return {"name": str(getattr(tokenizer, "name_or_path", "") or ""), "vocab_size": len(tokenizer)}


def _check_meta(meta_path: Path, old: CandidatesMeta, new: CandidatesMeta) -> None:
    for name, was, now in old.mismatches(new, any_model=True)[:1]:
        raise InputError(
            f"this file was sampled with {name}={was!r} but this run uses {now!r}; "
            "use a new output path (or delete the old file) instead of mixing them",
            meta_path,
            field=name,
        )


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
    kept, n_dup = dedupe_samples(samples)
    candidates = []
    for s in kept:
        graded = task.grade(s.text, example)
        candidates.append(
            Candidate(
                text=s.text,
                answer=graded.answer,
                correct=graded.correct,
                wrong_steps=task.wrong_steps(s.text),
                score=s.score,
            )
        )
    assign_ranks(candidates)
    return Group(
        id=example.id,
        task=task.name,
        prompt=prompt,
        reference=example.reference,
        answer=example.answer,
        candidates=candidates,
        meta={"k": k, "n_duplicates": n_dup},
    )


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


def sample_candidates(
    model,
    tokenizer,
    task,
    examples: list[Example],
    out_path: str | os.PathLike,
    cfg: SamplingConfig,
    model_name: str = "",
    progress: bool = True,
    generate: Callable[..., list[list[Sample]]] | None = None,
    prompt_format: PromptFormat = PLAIN,
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample, label and append one Group per example to `out_path` (JSONL), resuming a partial file.

    Questions are processed in order of prompt length (less padding), so the file's line order is not the
    input order; match groups by id. Returns the stats that are also stored in the meta sidecar.

    generate(prompts, cfg, seeds=..., on_done=...) swaps the engine (vllm_backend.VLLMEngine.generate); `engine`
    names it in the sidecar ({"name", "version", ...}; default: the built-in sampler on this torch).
    """
    out_path = Path(out_path)
    meta_path = meta_path_for(out_path)
    seen_ids: set[str] = set()
    for ex in examples:
        if ex.id in seen_ids:
            raise InputError(f"duplicate example id {ex.id!r} in the input", field="id")
        seen_ids.add(ex.id)

    meta = CandidatesMeta(
        task=task.name,
        model=model_name,
        tokenizer=tokenizer_info(tokenizer),
        sampling=cfg.to_dict(),
        prompt_format=prompt_format.to_meta(tokenizer),
        engine=engine or builtin_engine_info(model),
    )
    has_data = out_path.exists() and out_path.stat().st_size > 0
    if has_data and meta_path.exists():
        _check_meta(
            meta_path, CandidatesMeta.read(meta_path), meta
        )  # before touching the data file: a mismatch leaves it as it was
    elif has_data:
        raise InputError(
            f"has candidates but no {meta_path.name} to check them against; refusing to append "
            "samples of unknown origin (use a new output path)",
            out_path,
        )

    truncate_torn_tail(out_path)
    done = _done_ids(out_path)
    todo = [ex for ex in examples if ex.id not in done]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    replace(meta, status="running").write(meta_path)

    prompts = {ex.id: prompt_format.render(tokenizer, task.prompt(ex)) for ex in todo}
    lengths = {ex.id: len(encode_prompt(tokenizer, prompts[ex.id])) for ex in todo}
    todo.sort(key=lambda ex: -lengths[ex.id])  # stable: equal lengths keep input order
    t0 = time.perf_counter()
    counts = {"samples": 0, "tokens": 0}
    with tqdm(total=len(todo), desc=f"sampling {task.name}", unit="q", disable=not progress) as bar:

        def store(done: list[tuple[int, list[Sample]]]) -> None:
            """Label and append the questions that just finished (one fsynced append)."""
            groups = []
            for i, samples in done:
                ex = todo[i]
                g = build_group(task, ex, prompts[ex.id], samples, cfg.k)
                if prompt_format.kind == "chat":  # the user turn as a message too: TRL's conversational format
                    g.meta["messages"] = [{"role": "user", "content": task.prompt(ex).strip()}]
                # compute accounting: every sampled token, duplicates included
                g.meta["generated_tokens"] = sum(x.n_tokens for x in samples)
                counts["samples"] += len(samples)
                counts["tokens"] += g.meta["generated_tokens"]
                groups.append(g)
            append_jsonl(out_path, [g.to_dict() for g in groups])
            bar.update(len(done))

        if todo:
            todo_prompts = [prompts[ex.id] for ex in todo]
            seeds = [question_seed(cfg.seed, ex.id) for ex in todo]
            if generate is not None:
                generate(todo_prompts, cfg, seeds=seeds, on_done=store)
            else:
                generate_k(model, tokenizer, todo_prompts, cfg, seeds=seeds, on_done=store)
    n_samples, n_tokens = counts["samples"], counts["tokens"]
    wall = time.perf_counter() - t0

    groups = read_groups(out_path) if out_path.exists() else []
    stats = group_stats(groups)
    stats.update(
        {
            "new_questions": len(todo),
            "resumed_questions": len(done),
            "new_samples": n_samples,
            "wall_s": round(wall, 3),
            "samples_per_s": n_samples / wall if wall > 0 else 0.0,
            # the whole file's (exact under resume: each group records its own), and this run's
            "generated_tokens": sum(int(g.meta.get("generated_tokens", 0)) for g in groups),
            "new_generated_tokens": n_tokens,
        }
    )
    replace(meta, status="complete", stats=stats).write(meta_path)
    return stats


def builtin_engine_info(model) -> dict[str, Any]:
    """The sidecar's engine entry for the built-in sampler: its kernels are torch's."""
    import torch

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.") if model is not None else None
    return {"name": "hf", "version": f"torch {torch.__version__}", **({"dtype": dtype} if dtype else {})}


def subsample_candidates(src: str | os.PathLike, dst: str | os.PathLike, k: int) -> None:
    """dst = src with the first k (distinct) candidates per group, ranks recomputed on the subset: a smaller
    k from one sampling pass at a larger one (the first k distinct draws of the larger pass)."""
    src, dst = Path(src), Path(dst)
    groups = read_groups(src)
    for g in groups:
        g.candidates = g.candidates[:k]
        assign_ranks(g.candidates)
        g.meta = {**g.meta, "k": k, "derived_from": src.name}
    meta = CandidatesMeta.read(meta_path_for(src))
    meta = replace(meta, sampling={**meta.sampling, "k": k}, derived_from=src.name, stats=group_stats(groups))
    write_jsonl(dst, [g.to_dict() for g in groups])
    meta.write(meta_path_for(dst))
