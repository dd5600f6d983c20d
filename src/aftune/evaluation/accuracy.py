"""Greedy-decoding accuracy: one batched, left-padded pass over a split (no per-question Python loop)."""

from __future__ import annotations

from collections import defaultdict

from aftune.records import Example
from aftune.sampling.sampler import SamplingConfig, generate_k
from aftune.tasks import Task

# A model that keeps writing after its answer would start a new question: cut there.
STOP = ("\nQuestion:",)


def greedy_predictions(model, tokenizer, items: list[tuple[Task, Example]], max_new_tokens: int = 256,
                       batch_size: int = 64, progress: bool = False) -> list[dict]:
    cfg = SamplingConfig(k=1, temperature=0.0, max_new_tokens=max_new_tokens, stop=STOP, batch_size=batch_size)
    outs = generate_k(model, tokenizer, [t.prompt(e) for t, e in items], cfg, progress=progress)
    rows = []
    for (t, e), (s,) in zip(items, outs):
        pred = t.extract_answer(s.text)
        rows.append({"id": e.id, "task": t.name, "gold": e.answer, "prediction": pred,
                     "correct": t.answers_match(pred, e.answer), "score": s.score, "completion": s.text})
    return rows


def summarize(rows: list[dict]) -> dict:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per_task[r["task"]].append(r["correct"])
    acc = sum(r["correct"] for r in rows) / len(rows) if rows else None
    return {"accuracy": acc, "n": len(rows),
            "per_task": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in per_task.items()}}


def greedy_accuracy(model, tokenizer, items: list[tuple[Task, Example]], max_new_tokens: int = 256,
                    batch_size: int = 64, progress: bool = False) -> dict:
    rows = greedy_predictions(model, tokenizer, items, max_new_tokens, batch_size, progress)
    return {**summarize(rows), "predictions": rows}
