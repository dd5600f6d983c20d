"""Data in and out of TRL (docs/trl-interop.md): candidates as TRL's datasets, and TRL-style datasets as
candidates files.

Formats (TRL 1.16's names; conversational, with {role, content} messages, when the candidates were sampled
with a chat template):

- unpaired preference: one row per completion, `prompt`, `completion`, `label` (bool): what `KTOTrainer`
  reads, and AFT's binary feedback (rows sharing a prompt are one question).
- preference (pairwise): `prompt`, `chosen`, `rejected`: what `DPOTrainer` reads; every (correct, wrong)
  pair of a question, or a seeded sample of at most N per question.
- grouped: aftune's own records, one row per question (docs/records.md), `meta` stored as JSON text in
  `meta_json` (a free-form object has no fixed Parquet type).

Exported datasets are Parquet files (`OUT/train.parquet`) that `datasets.load_dataset("parquet", ...)` reads,
with `OUT/meta.json` and `OUT/README.md` saying where they came from. Nothing here prints.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any

from aftune.io import InputError, atomic_write_json, atomic_write_text, file_sha256, iter_jsonl, write_jsonl
from aftune.records import CandidatesMeta, Group, meta_path_for
from aftune.sampling.store import group_stats, normalize_whitespace
from aftune.training.data import UNPAIRED_COLUMNS, groups_from_unpaired

PAIRWISE_COLUMNS = ("prompt", "chosen", "rejected")
GROUPED_COLUMNS = ("id", "task", "prompt", "reference", "answer", "candidates", "meta_json")
FORMATS = ("unpaired", "pairwise", "grouped")
# the TRL trainer that reads each exported format as it is
TRL_TRAINER = {"unpaired": "KTOTrainer", "pairwise": "DPOTrainer", "grouped": None}
DATA_FILE = "train.parquet"
_CONVERSATIONAL = "conversational rows (lists of messages) need a chat template; give {} as text"


# --------------------------------------------------------------------------- candidates -> rows


def _conversational(group: Group) -> bool:
    """Sampled with a chat template: `aftune sample` kept the user turn as `meta.messages`."""
    return isinstance(group.meta.get("messages"), list)


def _prompt(group: Group) -> str | list[dict[str, str]]:
    return group.meta["messages"] if _conversational(group) else group.prompt


def _completion(group: Group, text: str) -> str | list[dict[str, str]]:
    """TRL's conversational rows pair a user-message prompt with an assistant-message completion."""
    return [{"role": "assistant", "content": text}] if _conversational(group) else text


def _positives(group: Group, include_reference: bool) -> list[str]:
    """Texts of the group's correct completions; the reference first when included (unless a candidate
    already is the reference, or has its text up to whitespace)."""
    texts = [c.text for c in group.candidates if c.correct]
    if include_reference and group.reference:
        seen = {normalize_whitespace(t) for t in texts}
        if not any(c.is_reference for c in group.candidates) and normalize_whitespace(group.reference) not in seen:
            texts.insert(0, group.reference)
    return texts


def to_unpaired(groups: Iterable[Group], include_reference: bool = True) -> list[dict[str, Any]]:
    """TRL's unpaired-preference rows (`KTOTrainer`): one per candidate, `label` = `correct`; with
    `include_reference`, a group's reference is one more row labelled True (first in its group).

    Example:
        >>> from aftune.records import Candidate, Group
        >>> g = Group(id="q1", task="arith", prompt="Q: 2+3?\\nA:\\n", reference="2+3=5\\n#### 5", answer="5",
        ...           candidates=[Candidate("2+3=6\\n#### 6", "6", False)])
        >>> [(r["completion"], r["label"]) for r in to_unpaired([g])]
        [('2+3=5\\n#### 5', True), ('2+3=6\\n#### 6', False)]
        >>> len(to_unpaired([g], include_reference=False))
        1
    """
    rows = []
    for g in groups:
        texts = _positives(g, include_reference)
        if len(texts) > g.n_positive:  # the reference joined the positives
            rows.append({"prompt": _prompt(g), "completion": _completion(g, texts[0]), "label": True})
        rows += [
            {"prompt": _prompt(g), "completion": _completion(g, c.text), "label": c.correct} for c in g.candidates
        ]
    return rows


def all_pairs(group: Group, include_reference: bool = True) -> list[tuple[str, str]]:
    """Every (correct, wrong) pair of one question, positive-major: n_pos * n_neg pairs."""
    neg = [c.text for c in group.candidates if not c.correct]
    return list(product(_positives(group, include_reference), neg))


def to_pairwise(
    groups: Iterable[Group], max_pairs: int | None = None, seed: int = 0, include_reference: bool = True
) -> list[dict[str, Any]]:
    """TRL's preference rows (`DPOTrainer`): `prompt`, `chosen` (a correct completion), `rejected` (a wrong
    one), every pair of each question, or at most `max_pairs` of them drawn uniformly without replacement.
    The draw is seeded by (seed, task, id), so a question's pairs do not depend on the other questions;
    drawn pairs keep their positive-major order. Questions without both kinds give no pair.

    Example:
        >>> from aftune.records import Candidate, Group
        >>> g = Group(id="q1", task="arith", prompt="Q: 2+3?\\nA:\\n", reference="#### 5", answer="5",
        ...           candidates=[Candidate("#### 6", "6", False), Candidate("#### 7", "7", False)])
        >>> [(r["chosen"], r["rejected"]) for r in to_pairwise([g])]
        [('#### 5', '#### 6'), ('#### 5', '#### 7')]
        >>> len(to_pairwise([g], max_pairs=1)), to_pairwise([g], include_reference=False)
        (1, [])
    """
    if max_pairs is not None and max_pairs < 1:
        raise InputError(f"must be >= 1, got {max_pairs}", field="max_pairs")
    rows = []
    for g in groups:
        pairs = all_pairs(g, include_reference)
        if max_pairs is not None and len(pairs) > max_pairs:
            keep = sorted(random.Random(f"{seed}/{g.task}/{g.id}").sample(range(len(pairs)), max_pairs))
            pairs = [pairs[i] for i in keep]
        rows += [{"prompt": _prompt(g), "chosen": _completion(g, c), "rejected": _completion(g, r)} for c, r in pairs]
    return rows


def to_grouped(groups: Iterable[Group]) -> list[dict[str, Any]]:
    """aftune's records as dataset rows: `Group.to_dict()` with `meta` as JSON text in `meta_json`.

    Example:
        >>> from aftune.records import Group
        >>> row = to_grouped([Group(id="q1", task="arith", prompt="p", reference="r", answer="5", meta={"k": 4})])[0]
        >>> row["meta_json"]
        '{"k": 4}'
    """
    rows = []
    for g in groups:
        d = g.to_dict()
        meta = d.pop("meta")
        for c in d["candidates"]:
            c["score"] = None if c["score"] is None else float(c["score"])
        rows.append({**d, "meta_json": json.dumps(meta, ensure_ascii=False, sort_keys=True)})
    return rows


# --------------------------------------------------------------------------- rows -> candidates


@dataclass(frozen=True)
class Where:
    """Where a row came from: a JSONL line or a Parquet / in-memory row (1-based)."""

    path: str
    n: int
    unit: str = "row"  # "line" (JSONL) or "row"

    def error(self, message: str, field: str | None = None) -> InputError:
        if self.unit == "line":
            return InputError(message, self.path, self.n, field)
        e = InputError(message, f"{self.path}: row {self.n}", None, field)
        e.path, e.line = self.path, self.n
        return e


def _text(row: dict, name: str, where: Where) -> str:
    if name not in row:
        raise where.error("missing field", name)
    value = row[name]
    if isinstance(value, list):
        raise where.error(_CONVERSATIONAL.format(name), name)
    if not isinstance(value, str):
        raise where.error(f"expected str, got {type(value).__name__}", name)
    return value


def _check_unpaired(row: dict, where: Where) -> dict[str, Any]:
    _text(row, "prompt", where)
    _text(row, "completion", where)
    if "label" not in row:
        raise where.error("missing field", "label")
    if not isinstance(row["label"], bool):
        raise where.error(f"expected bool, got {type(row['label']).__name__}", "label")
    return {k: row[k] for k in UNPAIRED_COLUMNS}


def _located(rows: Iterable[dict[str, Any]], source: str) -> Iterator[tuple[Where, dict]]:
    for i, row in enumerate(rows):
        yield Where(source, i + 1), row


def _unpaired_from_pairwise(located: Iterable[tuple[Where, dict]]) -> list[dict[str, Any]]:
    """Preference rows -> unpaired rows: chosen -> True, rejected -> False, each (prompt, text) once, in the
    order first seen. A text that is chosen in one pair and rejected in another of the same prompt has no
    binary label: an error naming both rows."""
    by_prompt: dict[str, dict[str, tuple[bool, Where]]] = {}
    for where, row in located:
        prompt = _text(row, "prompt", where)
        texts = by_prompt.setdefault(prompt, {})
        for name, label in (("chosen", True), ("rejected", False)):
            text = _text(row, name, where)
            seen = texts.get(text)
            if seen is None:
                texts[text] = (label, where)
            elif seen[0] != label:
                other = "chosen" if seen[0] else "rejected"
                first = seen[1]
                at = (
                    "this row"
                    if first == where
                    else f"{'' if first.path == where.path else first.path + ': '}{first.unit} {first.n}"
                )
                raise where.error(
                    f"this completion is also '{other}' for this prompt ({at}); binary labels "
                    f"cannot say it is both right and wrong",
                    name,
                )
    return [
        {"prompt": p, "completion": t, "label": label}
        for p, texts in by_prompt.items()
        for t, (label, _) in texts.items()
    ]


def from_pairwise(rows: Iterable[dict[str, Any]], task: str = "custom", source: str = "dataset") -> list[Group]:
    """TRL's preference format (`prompt`, `chosen`, `rejected`) -> Groups with binary labels: per prompt,
    every distinct chosen text is a correct candidate and every distinct rejected one a wrong candidate.
    Groups have no reference (`""`) and keep the order of their first row, like `groups_from_unpaired`.

    Example:
        >>> gs = from_pairwise([{"prompt": "Q: 2+3?\\nA:\\n", "chosen": "#### 5", "rejected": "#### 6"},
        ...                     {"prompt": "Q: 2+3?\\nA:\\n", "chosen": "#### 5", "rejected": "#### 7"}], task="arith")
        >>> [(c.text, c.correct) for c in gs[0].candidates]
        [('#### 5', True), ('#### 6', False), ('#### 7', False)]
    """
    return groups_from_unpaired(_unpaired_from_pairwise(_located(rows, source)), task=task, source=source)


def _group_from_row(row: dict, where: Where) -> Group:
    row = dict(row)
    meta_json = row.pop("meta_json", None)
    if meta_json is not None:
        try:
            meta = json.loads(meta_json) if isinstance(meta_json, str) else None
        except json.JSONDecodeError as e:
            raise where.error(f"not valid JSON ({e})", "meta_json") from None
        if not isinstance(meta, dict):
            raise where.error("expected a JSON object as text", "meta_json")
        row["meta"] = meta
    try:
        return Group.from_dict(row)
    except InputError as e:  # raised without a place: say it with this row's
        message = str(e).removeprefix(f"field '{e.field}': ") if e.field is not None else str(e)
        raise where.error(message, e.field) from None


# --------------------------------------------------------------------------- files


def dataset_files(path: str | os.PathLike) -> list[Path]:
    """The data files of `path`: the file itself (.parquet or .jsonl), or a folder's `train.parquet`, else
    the .parquet files under it (sorted; only those named `train*` when there are such, as in a dataset
    downloaded from the hub: its other splits are not training data), else the .jsonl files alike."""
    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist", path)
    if path.is_file():
        if path.suffix not in (".parquet", ".jsonl"):
            raise InputError("expected a .parquet or .jsonl file (or a folder of them)", path)
        return [path]
    if (path / DATA_FILE).is_file():
        return [path / DATA_FILE]
    for ext in ("parquet", "jsonl"):
        files = sorted(p for p in path.rglob(f"*.{ext}") if p.is_file())
        train = [p for p in files if p.name.startswith("train")]  # a hub layout: train-00000-of-00002.parquet, ...
        if files:
            return train or files
    raise InputError("folder holds no .parquet or .jsonl file", path)


def _file_rows(path: Path) -> tuple[list[str], Iterator[tuple[Where, dict]]]:
    """(columns, located rows) of one data file; JSONL columns are the first record's keys."""
    if path.suffix == ".jsonl":
        records = list(iter_jsonl(path))
        columns = list(records[0][1]) if records else []
        return columns, ((Where(str(path), line, "line"), obj) for line, obj in records)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"not a readable Parquet file ({' '.join(str(e).split())})", path) from None
    return table.column_names, _located(table.to_pylist(), str(path))


def detect_format(columns: Iterable[str]) -> str | None:
    """'unpaired', 'pairwise' or 'grouped' from a dataset's column names (None: none of them).

    Example:
        >>> detect_format(["prompt", "chosen", "rejected"]), detect_format(["text"])
        ('pairwise', None)
    """
    cols = set(columns)
    if set(UNPAIRED_COLUMNS) <= cols:
        return "unpaired"
    if {"chosen", "rejected"} <= cols:
        return "pairwise"
    if "candidates" in cols:
        return "grouped"
    return None


def read_dataset(path: str | os.PathLike, task: str | None = None) -> tuple[list[Group], dict[str, Any]]:
    """Groups of a dataset file or folder in any of the three formats, and what was read
    (`{"format", "files", "rows"}`). Unpaired and pairwise rows become groups of task `task` (default
    "custom") with no reference; grouped rows keep their own task unless `task` is given. Every row is
    checked: a bad one is one InputError naming the file, the row (a JSONL line) and the field.

    Example:
        >>> groups, info = read_dataset("runs/trl/unpaired", task="arith")  # doctest: +SKIP
    """
    files = dataset_files(path)
    fmt, located, n_rows = None, [], 0
    for f in files:
        columns, rows = _file_rows(f)
        this = detect_format(columns)
        if this is None:
            if not columns:  # an empty JSONL file: no rows to read
                continue
            raise InputError(
                f"expected TRL's unpaired format ({', '.join(UNPAIRED_COLUMNS)}), its preference "
                f"format ({', '.join(PAIRWISE_COLUMNS)}) or aftune's grouped records; got columns "
                f"{sorted(columns)}",
                f,
            )
        if fmt is not None and this != fmt:
            raise InputError(f"holds the {this} format, but {files[0]} holds the {fmt} format", f)
        fmt = this
        rows = list(rows)
        n_rows += len(rows)
        located += rows
    if not located:
        raise InputError("no rows", path)
    if fmt == "grouped":
        groups, seen = [], set()
        for where, row in located:
            g = _group_from_row(row, where)
            if (g.task, g.id) in seen:
                raise where.error(f"duplicate group id {g.id!r}", "id")
            seen.add((g.task, g.id))
            groups.append(g)
        if len({g.id for g in groups}) < len(groups):  # several tasks share ids; a candidates file may not
            groups = [replace(g, id=f"{g.task}-{g.id}") for g in groups]
        if task:
            groups = [replace(g, task=task) for g in groups]
    else:
        rows = (
            _unpaired_from_pairwise(located)
            if fmt == "pairwise"
            else [_check_unpaired(row, where) for where, row in located]
        )
        groups = groups_from_unpaired(rows, task=task or "custom", source=str(path))
    return groups, {"format": fmt, "files": [str(f) for f in files], "rows": n_rows}


def import_dataset(path: str | os.PathLike, out: str | os.PathLike, task: str | None = None) -> dict[str, Any]:
    """`aftune import`: a dataset (`read_dataset`) -> a candidates file `out` and its `out.meta.json`
    (task, model "", where it came from), written atomically; returns the sidecar's stats.

    Example:
        >>> import_dataset("labelled.parquet", "runs/imported.jsonl", task="gsm8k")  # doctest: +SKIP
    """
    groups, info = read_dataset(path, task)
    tasks = sorted({g.task for g in groups}, key=[g.task for g in groups].index)
    stats = {
        **group_stats(groups),
        "rows": info["rows"],
        "format": info["format"],
        "imported_from": info["files"],
        "note": f"imported by `aftune import` from the {info['format']} dataset {path}: labels were made "
        "outside aftune (not by the task's grader)" + ("" if info["format"] == "grouped" else "; no references"),
    }
    out = Path(out)
    write_jsonl(out, [g.to_dict() for g in groups])
    CandidatesMeta(task=",".join(tasks), model="", status="complete", stats=stats, derived_from=str(path)).write(
        meta_path_for(out)
    )
    return stats


def write_parquet(rows: list[dict[str, Any]], fmt: str, path: str | os.PathLike, conversational: bool = False) -> Path:
    """rows (of `fmt`) -> one Parquet file through `datasets`, written to a temporary file and renamed, so
    a reader never sees half of one. Columns have fixed types, so an empty export still has its schema;
    `conversational`: prompts and completions are lists of {role, content} messages (TRL's chat format)."""
    from datasets import Dataset, Features, List, Value
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    text = Value("string")
    turn = List({"role": text, "content": text}) if conversational else text
    features = {
        "unpaired": Features({"prompt": turn, "completion": turn, "label": Value("bool")}),
        "pairwise": Features({"prompt": turn, "chosen": turn, "rejected": turn}),
        "grouped": Features(
            {
                "id": text,
                "task": text,
                "prompt": text,
                "reference": text,
                "answer": text,
                "candidates": List(
                    {
                        "text": text,
                        "answer": text,
                        "correct": Value("bool"),
                        "rank": Value("int64"),
                        "wrong_steps": Value("int64"),
                        "score": Value("float64"),
                        "is_reference": Value("bool"),
                    }
                ),
                "meta_json": text,
            }
        ),
    }[fmt]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a library call prints nothing
    try:
        Dataset.from_list(rows, features=features).to_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if not quiet:
            enable_progress_bars()
    return path


def _source_info(path: Path, n_groups: int) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path), "questions": n_groups}
    mp = meta_path_for(path)
    if mp.exists():
        meta = CandidatesMeta.read(mp)
        info.update(task=meta.task, model=meta.model, status=meta.status)
    return info


_README = """# {fmt} dataset exported by aftune

`{data}`: {rows} rows from {questions} questions of {sources}.
{what}

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files="{data}", split="train")
```

`meta.json` has the counts, the settings and the sha256 of each source file. Written by `aftune export`
(docs/trl-interop.md).
"""

_WHAT = {
    "unpaired": "TRL's unpaired-preference format (`prompt`, `completion`, `label`), what `trl.KTOTrainer` reads: "
    "one row per candidate, `label` = the task grader's verdict{ref}.",
    "pairwise": "TRL's preference format (`prompt`, `chosen`, `rejected`), what `trl.DPOTrainer` reads: {pairs} "
    "(correct, wrong) pairs of each question{ref}.",
    "grouped": "aftune's own records (docs/records.md), one row per question, `meta` as JSON text in `meta_json`.",
}


def export_groups(
    sources: dict[str, list[Group]],
    fmt: str,
    out: str | os.PathLike,
    max_pairs: int | None = None,
    seed: int = 0,
    include_reference: bool = True,
) -> dict[str, Any]:
    """`aftune export`: the groups of each source file (path -> groups) as a dataset of `fmt` in folder
    `out`: `out/train.parquet`, `out/meta.json` (counts, settings, sources) and `out/README.md`. Returns
    the meta.json object.

    Example:
        >>> from aftune import read_groups
        >>> export_groups({"runs/cands.jsonl": read_groups("runs/cands.jsonl")}, "pairwise", "runs/trl/dpo",
        ...               max_pairs=8)  # doctest: +SKIP
    """
    if fmt not in FORMATS:
        raise InputError(f"expected {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, got {fmt!r}", field="format")
    groups = [g for gs in sources.values() for g in gs]
    chat = {_conversational(g) for g in groups}
    if len(chat) > 1:
        raise InputError("some candidates were sampled with a chat template and some without; export them apart")
    conversational = fmt != "grouped" and chat == {True}
    if fmt == "unpaired":
        rows = to_unpaired(groups, include_reference)
    elif fmt == "pairwise":
        rows = to_pairwise(groups, max_pairs, seed, include_reference)
    else:
        rows = to_grouped(groups)
    out = Path(out)
    data = write_parquet(rows, fmt, out / DATA_FILE, conversational)
    pos = sum(len(_positives(g, include_reference)) for g in groups)
    meta: dict[str, Any] = {
        "format": fmt,
        "trl_trainer": TRL_TRAINER[fmt],
        "data_file": data.name,
        "rows": len(rows),
        "columns": list({"unpaired": UNPAIRED_COLUMNS, "pairwise": PAIRWISE_COLUMNS, "grouped": GROUPED_COLUMNS}[fmt]),
        "questions": len(groups),
        "candidates": sum(len(g.candidates) for g in groups),
        "positives": pos if fmt != "grouped" else sum(g.n_positive for g in groups),
        "negatives": sum(g.n_negative for g in groups),
        "include_reference": include_reference if fmt != "grouped" else None,
        "conversational": conversational,
        "sources": [_source_info(Path(p), len(gs)) for p, gs in sources.items()],
    }
    if fmt == "pairwise":
        meta.update(
            all_pairs=sum(len(all_pairs(g, include_reference)) for g in groups),
            max_pairs_per_question=max_pairs,
            seed=seed,
            questions_with_pairs=sum(bool(all_pairs(g, include_reference)) for g in groups),
        )
    ref = " (each question's reference solution is one more correct completion)" if include_reference else ""
    what = _WHAT[fmt].format(ref=ref, pairs="all" if max_pairs is None else f"at most {max_pairs} seeded")
    atomic_write_text(
        out / "README.md",
        _README.format(
            fmt=fmt,
            data=data.name,
            rows=len(rows),
            questions=len(groups),
            what=what,
            sources=", ".join(f"`{Path(p).name}`" for p in sources),
        ),
    )
    atomic_write_json(out / "meta.json", meta)
    return meta
