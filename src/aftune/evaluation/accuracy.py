"""Greedy-decoding accuracy: one batched, left-padded pass per task over a split (no per-question loop)."""

from __future__ import annotations

from collections import defaultdict

from aftune.prompting import PLAIN, PromptFormat
from aftune.records import Example
from aftune.sampling.arguments import sampling_config
from aftune.sampling.sampler import Sample, generate_k
from aftune.tasks import Task


def prediction_row(task: Task, example: Example, sample: Sample) -> dict:
    """One graded prediction, through the task's one grading path (the same as `aftune sample` labels with)."""
    graded = task.grade(sample.text, example)
    return {
        "id": example.id,
        "task": task.name,
        "gold": example.answer,
        "prediction": graded.answer,
        "correct": graded.correct,
        "score": sample.score,
        "completion": sample.text,
    }


def greedy_predictions(
    model,
    tokenizer,
    items: list[tuple[Task, Example]],
    max_new_tokens: int = 256,
    batch_size: int = 64,
    progress: bool = False,
    prompt_format: PromptFormat = PLAIN,
    generate=None,
) -> list[dict]:
    """Greedy completion of every (task, example), graded; rows in the order of `items`. `generate(prompts, cfg)`
    swaps the engine (aftune.sampling.engines.Engine.generate)."""
    rows: list[dict | None] = [None] * len(items)
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, (t, _) in enumerate(items):
        by_task[t.name].append(i)
    for idx in by_task.values():  # each task with its own stop strings
        task = items[idx[0]][0]
        cfg = sampling_config(
            [task],
            prompt_format,
            tokenizer,
            k=1,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        prompts = [prompt_format.render(tokenizer, task.prompt(items[i][1])) for i in idx]
        outs = (
            generate(prompts, cfg, progress=progress)
            if generate is not None
            else generate_k(model, tokenizer, prompts, cfg, progress=progress)
        )
        for i, (s,) in zip(idx, outs):
            rows[i] = prediction_row(task, items[i][1], s)
    return rows  # type: ignore[return-value]


def summarize(rows: list[dict]) -> dict:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per_task[r["task"]].append(r["correct"])
    acc = sum(r["correct"] for r in rows) / len(rows) if rows else None
    return {
        "accuracy": acc,
        "n": len(rows),
        "per_task": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in per_task.items()},
    }


def greedy_accuracy(
    model,
    tokenizer,
    items: list[tuple[Task, Example]],
    max_new_tokens: int = 256,
    batch_size: int = 64,
    progress: bool = False,
    prompt_format: PromptFormat = PLAIN,
    generate=None,
) -> dict:
    """{"accuracy", "n", "per_task", "predictions"}: greedy accuracy of `model` on `items`.

    Example:
        >>> from aftune import get_task
        >>> from aftune.evaluation import greedy_accuracy
        >>> task = get_task("arith", n_train=10, n_validation=2, n_test=4)
        >>> res = greedy_accuracy(model, tok, [(task, e) for e in task.load("test")])  # doctest: +SKIP
    """
    rows = greedy_predictions(model, tokenizer, items, max_new_tokens, batch_size, progress, prompt_format, generate)
    return {**summarize(rows), "predictions": rows}
