"""The record formats that flow between pipeline steps, and their validation (docs/records.md).

Example: one task problem.  Group: an example plus the candidate solutions sampled for it, one JSON object
per line of a candidates file (what `aftune sample` writes and `aftune align` / `aftune assess` read).
CandidatesMeta: the `<file>.meta.json` sidecar that says how a candidates file was made, so a resumed or
merged run never mixes candidates of different tasks, tokenizers or sampling settings.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aftune.io import InputError, atomic_write_json, iter_jsonl, read_json_object, require


@dataclass
class Example:
    """One task problem.

    Example:
        >>> Example(id="q1", question="2 + 3?", reference="2 + 3 = 5\\n#### 5", answer="5").answer
        '5'
    """

    id: str
    question: str
    reference: str  # gold solution exactly as the model is trained to write it, ending in its answer line
    answer: str  # gold final answer, normalised by the task
    options: dict[str, str] | None = None  # multiple choice: letter -> option text
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Example:
        return cls(
            id=str(d["id"]),
            question=d["question"],
            reference=d["reference"],
            answer=str(d["answer"]),
            options=dict(d["options"]) if d.get("options") else None,
            meta=dict(d.get("meta") or {}),
        )


_CANDIDATE_TYPES: dict[str, tuple[type, ...]] = {
    "answer": (str,),
    "rank": (int,),
    "wrong_steps": (int,),
    "score": (int, float),
    "is_reference": (bool,),
}


@dataclass
class Candidate:
    """One sampled solution of a question, labelled by the task's grader.

    Example:
        >>> Candidate(text="2 + 3 = 6\\n#### 6", answer="6", correct=False).correct
        False
    """

    text: str
    answer: str | None  # final answer extracted by Task.grade (None when none could be extracted)
    correct: bool  # Task.grade's verdict on the same extraction
    rank: int | None = None  # 0 = best; from step-by-step feedback (tasks.feedback)
    wrong_steps: int | None = None  # calculator annotations that are arithmetically wrong
    score: float | None = None  # length-normalised log-likelihood under the sampling model
    is_reference: bool = False  # the gold solution, added by training (never written by `aftune sample`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, path: Any = None, line: int | None = None, where: str = "candidate") -> Candidate:
        """Validate and build; a malformed record raises InputError naming the file, line and field."""
        if not isinstance(d, dict):
            raise InputError("expected a JSON object", path, line, where)
        for name, types in (("text", str), ("correct", bool)):
            if name not in d:
                raise InputError("missing field", path, line, f"{where}.{name}")
            if not isinstance(d[name], types):
                raise InputError(
                    f"expected {types.__name__}, got {type(d[name]).__name__}", path, line, f"{where}.{name}"
                )
        for name, types in _CANDIDATE_TYPES.items():
            value = d.get(name)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
                raise InputError(
                    f"expected {' or '.join(t.__name__ for t in types)} or null, got {type(value).__name__}",
                    path,
                    line,
                    f"{where}.{name}",
                )
        return cls(
            text=d["text"],
            answer=d.get("answer"),
            correct=d["correct"],
            rank=d.get("rank"),
            wrong_steps=d.get("wrong_steps"),
            score=d.get("score"),
            is_reference=bool(d.get("is_reference")),
        )


@dataclass
class Group:
    """A question and its candidates: one line of a candidates file.

    `reference` may be empty (data labelled elsewhere, e.g. imported from TRL's unpaired format): then
    training has no gold solution to add as a positive.

    Example:
        >>> g = Group(id="q1", task="arith", prompt="Question: 2 + 3?\\nAnswer:\\n", reference="#### 5", answer="5",
        ...           candidates=[Candidate("#### 5", "5", True), Candidate("#### 6", "6", False)])
        >>> g.mixed, Group.from_dict(g.to_dict()) == g
        (True, True)
    """

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
    def from_dict(cls, d: Any, path: Any = None, line: int | None = None) -> Group:
        """Validate and build; a malformed record raises InputError naming the file, line and field."""
        if not isinstance(d, dict):
            raise InputError("expected a JSON object", path, line)
        gid = require(d, "id", (str, int), path, line)
        for name in ("task", "prompt", "reference"):
            require(d, name, str, path, line)
        require(d, "answer", (str, int), path, line)
        cands = require(d, "candidates", list, path, line)
        if d.get("meta") is not None and not isinstance(d["meta"], dict):
            raise InputError(f"expected object, got {type(d['meta']).__name__}", path, line, "meta")
        return cls(
            id=str(gid),
            task=d["task"],
            prompt=d["prompt"],
            reference=d["reference"],
            answer=str(d["answer"]),
            candidates=[Candidate.from_dict(c, path, line, f"candidates[{i}]") for i, c in enumerate(cands)],
            meta=dict(d.get("meta") or {}),
        )


def read_groups(path: str | os.PathLike) -> list[Group]:
    """Read a candidates file; a malformed record raises InputError naming the file, line and field.

    Example:
        >>> from aftune import read_groups
        >>> groups = read_groups("runs/candidates.jsonl")  # doctest: +SKIP
    """
    path = Path(path)
    groups: list[Group] = []
    ids: set[str] = set()
    for line, obj in iter_jsonl(path):
        g = Group.from_dict(obj, path, line)
        if g.id in ids:
            raise InputError(f"duplicate group id {g.id!r}", path, line, "id")
        ids.add(g.id)
        groups.append(g)
    return groups


# --------------------------------------------------------------------------- the sidecar

META_FORMAT_VERSION = 1
# Settings that change which candidates are drawn: a resumed run and merged shards must match them exactly.
# batch_size and seed may differ (they only change which random draws are made).
CHECKED_SAMPLING = ("k", "temperature", "top_p", "max_new_tokens", "stop")


def meta_path_for(candidates_path: str | os.PathLike) -> Path:
    return Path(str(candidates_path) + ".meta.json")


@dataclass
class CandidatesMeta:
    """`<candidates>.meta.json`: how a candidates file was made. Version 1 (files written before the field
    existed have the same layout and read as version 1)."""

    task: str | None = None
    model: str = ""
    tokenizer: dict[str, Any] = field(default_factory=dict)  # {"name", "vocab_size"}
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingConfig.to_dict()
    status: str | None = None  # "running" while sampling, "complete" once every question is written
    stats: dict[str, Any] | None = None
    merged_from: list[str] | None = None  # `aftune merge`: the shard files
    n_shards: int | None = None
    derived_from: str | None = None  # a subsample of another candidates file
    prompt_format: dict[str, Any] | None = None  # aftune.prompting: {"kind": "plain"} or chat + template hash
    engine: dict[str, Any] | None = None  # the sampling engine: {"name": "hf" | "vllm", "version", "dtype"}
    format_version: int = META_FORMAT_VERSION

    def signature(self) -> dict[str, Any]:
        """The settings two files must share to hold candidates of one sampling configuration."""
        sig = {
            "task": self.task,
            "model": self.model,
            "tokenizer.name": self.tokenizer.get("name"),
            "tokenizer.vocab_size": self.tokenizer.get("vocab_size"),
            # files written before prompt formats existed hold plain prompts
            "prompt_format": self.prompt_format or {"kind": "plain"},
        }
        # a file is continued only by the engine (and version) that began it: the same seeds draw the same
        # candidates only there (files from before engines were recorded: the built-in sampler, any version)
        engine = self.engine or {"name": "hf"}
        sig["engine"] = engine.get("name")
        sig["engine.version"] = engine.get("version")
        for key in CHECKED_SAMPLING:
            value = self.sampling.get(key)
            sig[f"sampling.{key}"] = list(value) if isinstance(value, (list, tuple)) else value
        return sig

    def mismatches(self, other: CandidatesMeta, any_model: bool = False) -> list[tuple[str, Any, Any]]:
        """(setting, self's value, other's value) for every checked setting that differs. With `any_model`,
        an empty model name (a caller that does not name its model) matches any."""
        mine, theirs = self.signature(), other.signature()
        return [
            (k, mine[k], theirs[k])
            for k in mine
            if mine[k] != theirs[k]
            and not (any_model and k == "model" and not (mine[k] and theirs[k]))
            and not (k == "engine.version" and None in (mine[k], theirs[k]))
        ]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def read(cls, path: str | os.PathLike) -> CandidatesMeta:
        d = read_json_object(path)
        version = d.get("format_version", 1)
        if version != META_FORMAT_VERSION:
            raise InputError(
                f"format_version {version!r} is not one this aftune reads ({META_FORMAT_VERSION})",
                path,
                field="format_version",
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def write(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())
