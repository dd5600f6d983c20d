"""The record formats that flow between pipeline steps (one JSON object per line).

Example: one task problem.  Group: an example plus the candidate solutions sampled for it,
which is what `aftune sample` writes and `aftune align` / `aftune assess` read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Example:
    id: str
    question: str
    reference: str  # gold solution exactly as the model is trained to write it, ending in its answer line
    answer: str  # gold final answer, normalised by the task
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Example":
        return cls(id=str(d["id"]), question=d["question"], reference=d["reference"],
                   answer=str(d["answer"]), meta=dict(d.get("meta") or {}))


@dataclass
class Candidate:
    text: str
    answer: str | None  # extracted final answer (None when none could be extracted)
    correct: bool
    rank: int | None = None  # 0 = best; from step-by-step feedback (tasks.feedback)
    wrong_steps: int | None = None  # calculator annotations that are arithmetically wrong
    score: float | None = None  # length-normalised log-likelihood under the sampling model
    is_reference: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        return cls(text=d["text"], answer=d.get("answer"), correct=bool(d["correct"]),
                   rank=d.get("rank"), wrong_steps=d.get("wrong_steps"), score=d.get("score"),
                   is_reference=bool(d.get("is_reference", False)))


@dataclass
class Group:
    id: str
    task: str
    prompt: str
    reference: str
    answer: str
    candidates: list[Candidate] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_positive(self) -> int:
        return sum(c.correct for c in self.candidates)

    @property
    def n_negative(self) -> int:
        return sum(not c.correct for c in self.candidates)

    @property
    def mixed(self) -> bool:
        return self.n_positive > 0 and self.n_negative > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = [c.to_dict() for c in self.candidates]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Group":
        return cls(id=str(d["id"]), task=d["task"], prompt=d["prompt"], reference=d["reference"],
                   answer=str(d["answer"]), candidates=[Candidate.from_dict(c) for c in d["candidates"]],
                   meta=dict(d.get("meta") or {}))
