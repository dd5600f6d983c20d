"""Tasks defined by a YAML file instead of Python (lm-evaluation-harness style): `--task path/to/task.yaml`.

A task file names the data (local JSONL/Parquet files or a hub dataset), the columns that hold the
question, the solution and the gold answer, the prompt template, the stop strings and one of four answer
types, each graded by code that already exists here:

- `number`: GSM8K's extraction and normalisation (`answers.extract_number`, `numbers_equal`);
- `choice`: multiple choice A-E (`choices.extract_choice`, option texts from `Example.options`);
- `math`: MATH-style answers (`math_answers.extract_math_answer`, `math_equal` in the sandboxed worker);
- `exact`: whitespace-normalised string equality of the text after the answer marker (or in the last box).

The file is read by `aftune.yaml_io` (PyYAML's safe constructors; alias bombs refused), and the prompt and
reference templates allow only `{name}` substitutions (no attribute access, indexing, conversions or format
specs), rendered with `str.format_map` on a plain dict of strings, so a task file can never run code.  Every
problem in a task
file is one `InputError` naming the file, the line and the key; every problem in a data row names the data
file, the line (for Parquet and hub data: the 1-based row) and the column.  The format: docs/task-files.md.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aftune.io import InputError, iter_jsonl, require
from aftune.records import Example
from aftune.tasks.answers import DEFAULT_MARKERS, extract_number, normalize_number, numbers_equal
from aftune.tasks.choices import LETTERS, extract_choice, format_options, normalize_letter
from aftune.tasks.hub import DatasetTask, import_datasets
from aftune.tasks.math_answers import extract_math_answer, math_equal
from aftune.yaml_io import YamlDoc, read_yaml

__all__ = ["FileTask", "TaskSpec", "describe_file", "parse_options", "read_task_spec"]

ANSWER_TYPES = ("number", "choice", "math", "exact")
ANSWER_FROM = ("after_marker", "last_boxed", "field")
SPLITS = ("train", "validation", "test")
DATA_SUFFIXES = (".jsonl", ".parquet")
DATA_VAR = "${AFTUNE_DATA}"
DEFAULT_PROMPT = "Question: {question}\nAnswer:\n"
DEFAULT_CHOICE_PROMPT = "Question: {question}\n{options}\nAnswer:\n"
DEFAULT_STOP = ("\nQuestion:",)

_TOP_KEYS = (
    "name",
    "description",
    "data",
    "fields",
    "answer_type",
    "answer_from",
    "answer_marker",
    "prompt",
    "reference",
    "stop",
)
_DATA_KEYS = (*SPLITS, "hub", "validation_from_train")
_HUB_KEYS = ("path", "name", "revision", "splits")
_FIELD_KEYS = ("question", "solution", "answer", "options", "id")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# Option entries written as "A) text", "(A) text" or "A. text" (AQuA style).
_LETTERED = re.compile(r"^\s*\(?([A-E])[).:]\s*(.*?)\s*$", re.DOTALL)


# ------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class TaskSpec:
    """A parsed, validated task file (nothing loaded yet); see docs/task-files.md for every key.

    Example (from the repository root):
        >>> spec = read_task_spec("configs/tasks/math_tiny.yaml")
        >>> spec.name, spec.answer_type, spec.answer_from
        ('math_tiny', 'math', 'last_boxed')
    """

    path: str  # as given (error messages quote it)
    name: str
    description: str
    answer_type: str
    answer_from: str
    answer_marker: str
    prompt: str
    reference: str
    prompt_fields: tuple[str, ...]  # the names the templates substitute
    reference_fields: tuple[str, ...]
    stop: tuple[str, ...]
    question_field: str
    solution_field: str | None
    answer_field: str | None
    options_field: str | tuple[str, ...] | None
    id_field: str | None
    files: dict[str, str] = field(default_factory=dict)  # split -> path (absolute, or starting ${AFTUNE_DATA})
    hub: dict[str, Any] | None = None  # {"path", "name", "revision", "splits": {split: hub split}}
    validation_from_train: int = 0
    doc: YamlDoc | None = field(default=None, compare=False, repr=False)  # the file as read: where each key is

    @property
    def splits(self) -> tuple[str, ...]:
        have = set(self.files) | set((self.hub or {}).get("splits", {}))
        if self.validation_from_train:
            have.add("validation")
        return tuple(s for s in SPLITS if s in have)

    def error(self, key: str, message: str) -> InputError:
        """An InputError at `key` (dotted), on the line of the key or of its closest parent."""
        return InputError(message, self.path, None if self.doc is None else self.doc.line(key), key)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Reader:
    """Typed access to the YAML mapping; every failure is one InputError at the key's line."""

    def __init__(self, doc: YamlDoc):
        self.path, self.data, self.error = doc.path, doc.data, doc.error

    def mapping(self, key: str, value: Any, known: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {_type_name(value)}")
        for k in value:
            if k not in known:
                where = f"{key}.{k}" if key else str(k)
                raise self.error(where, f"unknown key (known: {', '.join(known)})")
        return value

    def string(self, key: str, value: Any, required: bool = False, nonempty: bool = True) -> str | None:
        if value is None:
            if required:
                raise self.error(key, "missing required key")
            return None
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type_name(value)}")
        if nonempty and not value.strip():
            raise self.error(key, "expected a non-empty string")
        return value

    def choice(self, key: str, value: Any, allowed: tuple[str, ...], default: str | None = None) -> str:
        if value is None and default is not None:
            return default
        if value is None:
            raise self.error(key, f"missing required key (one of {', '.join(allowed)})")
        if value not in allowed:
            raise self.error(key, f"expected one of {', '.join(allowed)}, got {value!r}")
        return value


def template_fields(template: str, key: str, reader: _Reader) -> tuple[str, ...]:
    """The names a template substitutes; anything but a plain `{name}` is an error.

    Attribute access (`{a.b}`) and indexing (`{a[0]}`) are what make `str.format` reach into objects, so
    they are refused outright, as are positional `{}`, conversions (`{a!r}`) and format specs (`{a:>9}`).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # a lone `{` or `}`
        raise reader.error(key, f"not a valid template ({e}; write a literal brace as '{{{{' or '}}}}')") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise reader.error(
                key,
                "only {name} substitutions are allowed (no attribute access, indexing, "
                f"conversion or format spec), got '{shown}'",
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def read_task_spec(path: str | os.PathLike) -> TaskSpec:
    """Parse and validate a task file (aftune.yaml_io: safe constructors, no alias bombs); nothing is loaded
    from the data yet."""
    doc = _parse_file(path)
    r, data = _Reader(doc), doc.data
    # One step per group of keys, in this order: a file with several problems always reports the same one.
    head = _identity(r, data)
    columns = _columns(r, data)
    answer = _answer_source(r, data, head["answer_type"], columns)
    templates = _templates(r, data, head["answer_type"], columns["solution_field"])
    stop = _stop(r, data.get("stop", list(DEFAULT_STOP)))
    files, hub, holdout = _data(r, Path(path), data.get("data"))
    return TaskSpec(
        path=doc.path,
        **head,
        **columns,
        **answer,
        **templates,
        stop=stop,
        files=files,
        hub=hub,
        validation_from_train=holdout,
        doc=doc,
    )


def _parse_file(path: str | os.PathLike) -> YamlDoc:
    """The task file as a YAML mapping whose top-level keys are all known."""
    doc = read_yaml(path, "task file")
    if not isinstance(doc.data, dict):
        raise InputError(f"expected a mapping of keys to values, got {_type_name(doc.data)}", doc.path)
    _Reader(doc).mapping("", doc.data, _TOP_KEYS)
    return doc


def _identity(r: _Reader, data: dict) -> dict[str, str]:
    """name, description and answer_type."""
    name = r.string("name", data.get("name"), required=True)
    if not _NAME_RE.fullmatch(name):
        raise r.error(
            "name", f"expected letters, digits, '_', '-' or '.' (it is part of every example id), got {name!r}"
        )
    return {
        "name": name,
        "description": r.string("description", data.get("description"), nonempty=False) or "",
        "answer_type": r.choice("answer_type", data.get("answer_type"), ANSWER_TYPES),
    }


def _columns(r: _Reader, data: dict) -> dict[str, Any]:
    """`fields`: the data columns, as the TaskSpec's *_field values."""
    if "fields" not in data:
        raise r.error("fields", "missing required key")
    fields = r.mapping("fields", data["fields"], _FIELD_KEYS)
    return {
        "question_field": r.string("fields.question", fields.get("question"), required=True),
        "solution_field": r.string("fields.solution", fields.get("solution")),
        "answer_field": r.string("fields.answer", fields.get("answer")),
        "id_field": r.string("fields.id", fields.get("id")),
        "options_field": _options_field(r, fields.get("options")),
    }


def _answer_source(r: _Reader, data: dict, answer_type: str, columns: dict[str, Any]) -> dict[str, str]:
    """answer_from and answer_marker, checked against the columns the gold answer (and options) come from."""
    answer_field, solution_field = columns["answer_field"], columns["solution_field"]
    answer_from = r.choice(
        "answer_from",
        data.get("answer_from"),
        ANSWER_FROM,
        default="field" if answer_field is not None else "after_marker",
    )
    if answer_from == "field" and answer_field is None:
        raise r.error(
            "fields.answer",
            "missing: answer_from is 'field', so fields.answer must name the column that holds the gold answer",
        )
    if answer_from != "field" and answer_field is not None:
        raise r.error(
            "fields.answer",
            f"not used with answer_from '{answer_from}' (the answer comes from the "
            "solution); remove it or set answer_from: field",
        )
    if answer_from != "field" and solution_field is None:
        raise r.error("fields.solution", f"missing: answer_from '{answer_from}' reads the answer from the solution")
    if "answer_marker" in data and answer_from == "last_boxed":
        raise r.error("answer_marker", "not used with answer_from 'last_boxed'")
    answer_marker = r.string("answer_marker", data.get("answer_marker")) or "####"
    if answer_type == "choice" and columns["options_field"] is None:
        raise r.error("fields.options", "missing: answer_type 'choice' needs the column(s) holding the options")
    if answer_type != "choice" and columns["options_field"] is not None:
        raise r.error("fields.options", f"only used with answer_type 'choice', not '{answer_type}'")
    return {"answer_from": answer_from, "answer_marker": answer_marker}


def _templates(r: _Reader, data: dict, answer_type: str, solution_field: str | None) -> dict[str, Any]:
    """prompt and reference, and the names each substitutes."""
    prompt = r.string("prompt", data.get("prompt")) if "prompt" in data else None
    prompt = prompt if prompt is not None else (DEFAULT_CHOICE_PROMPT if answer_type == "choice" else DEFAULT_PROMPT)
    used = template_fields(prompt, "prompt", r)
    if "question" not in used:
        raise r.error("prompt", "the template must contain {question}")
    if "options" in used and answer_type != "choice":
        raise r.error("prompt", "{options} is only available with answer_type 'choice'")
    if {"solution", "answer"} & set(used):
        raise r.error(
            "prompt",
            "the prompt must not contain {solution} or {answer}: it would show the model what it is asked to produce",
        )
    reference = r.string("reference", data.get("reference")) if "reference" in data else None
    reference = reference if reference is not None else "{solution}"
    ref_used = template_fields(reference, "reference", r)
    if "solution" in ref_used and solution_field is None:
        raise r.error("reference", "uses {solution}, but fields.solution is not set")
    if "options" in ref_used and answer_type != "choice":
        raise r.error("reference", "{options} is only available with answer_type 'choice'")
    # A template's other names are data columns: checked per row at load time, naming the data file.
    return {"prompt": prompt, "prompt_fields": used, "reference": reference, "reference_fields": ref_used}


def _options_field(r: _Reader, value: Any) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return r.string("fields.options", value)
    if isinstance(value, list) and 2 <= len(value) <= len(LETTERS):
        for i, v in enumerate(value):
            r.string(f"fields.options.{i}", v, required=True)
        return tuple(value)
    raise r.error(
        "fields.options",
        f"expected one column name, or a list of 2-{len(LETTERS)} column names "
        f"(one per option, in letter order), got {value!r}",
    )


def _stop(r: _Reader, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise r.error("stop", f"expected a string or a list of strings, got {_type_name(value)}")
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s:
            raise r.error("stop", f"entry {i}: expected a non-empty string, got {s!r}")
    return tuple(items)


def _data(r: _Reader, task_path: Path, value: Any) -> tuple[dict[str, str], dict | None, int]:
    if value is None:
        raise r.error("data", "missing required key")
    data = r.mapping("data", value, _DATA_KEYS)
    files: dict[str, str] = {}
    for split in SPLITS:
        if split in data:
            files[split] = _data_path(r, task_path, f"data.{split}", data[split])
    hub = _hub(r, data["hub"]) if "hub" in data else None
    if not files and hub is None:
        raise r.error("data", "expected data files (train, validation, test) or a hub dataset (hub)")
    if files and hub is not None:
        if not any(f.startswith(DATA_VAR) for f in files.values()):
            raise r.error(
                "data.hub",
                f"give data files or a hub dataset, not both (the hub is the fallback only for "
                f"files under {DATA_VAR}, as for the built-in tasks)",
            )
        if set(files) != set(hub["splits"]):
            raise r.error("data.hub.splits", f"must name the same splits as the data files ({', '.join(files)})")
    holdout = data.get("validation_from_train", 0)
    if "validation_from_train" in data and (isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 1):
        raise r.error("data.validation_from_train", f"expected a positive integer, got {holdout!r}")
    splits = set(files) | set((hub or {}).get("splits", {}))
    if holdout and "validation" in splits:
        raise r.error("data.validation_from_train", "the data already has a validation split")
    if holdout and "train" not in splits:
        raise r.error("data.validation_from_train", "needs a train split to hold rows out of")
    return files, hub, holdout


def _data_path(r: _Reader, task_path: Path, key: str, value: Any) -> str:
    raw = r.string(key, value, required=True)
    if not raw.lower().endswith(DATA_SUFFIXES):
        raise r.error(key, f"expected a .jsonl or .parquet file, got {raw!r}")
    rest = raw.replace(DATA_VAR, "", 1) if raw.startswith(DATA_VAR) else raw
    if "${" in rest:
        raise r.error(key, f"the only variable a path may use is {DATA_VAR}, at its start; got {raw!r}")
    if raw.startswith(DATA_VAR):
        return DATA_VAR + "/" + rest.lstrip("/\\")
    p = Path(raw).expanduser()
    # Relative paths are relative to the task file, so a task file and its data can move together.
    return str(p if p.is_absolute() else (task_path.parent / p).resolve())


def _hub(r: _Reader, value: Any) -> dict[str, Any]:
    hub = r.mapping("data.hub", value, _HUB_KEYS)
    out = {
        "path": r.string("data.hub.path", hub.get("path"), required=True),
        "name": r.string("data.hub.name", hub.get("name")),
        "revision": r.string("data.hub.revision", hub.get("revision")),
    }
    if "splits" not in hub:
        raise r.error("data.hub.splits", "missing required key (e.g. {train: train, test: test})")
    splits = r.mapping("data.hub.splits", hub["splits"], SPLITS)
    if not splits:
        raise r.error("data.hub.splits", "expected at least one split")
    out["splits"] = {s: r.string(f"data.hub.splits.{s}", v, required=True) for s, v in splits.items()}
    return out


# ------------------------------------------------------------------------------------------- data rows


Rows = Iterator[tuple[int, dict[str, Any]]]


def parquet_rows(path: Path) -> Rows:
    """(1-based row number, row) of a Parquet file; errors name the file."""
    if not path.exists():
        raise InputError("file does not exist", path)
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 - optional: only Parquet task data needs it
    except ImportError:
        raise ImportError("reading Parquet task data needs pyarrow (pip install pyarrow, or 'aftune[hub]')") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for a bad file
        raise InputError(f"not a readable Parquet file ({type(e).__name__}: {e})", path) from None
    for i, row in enumerate(table.to_pylist()):
        yield i + 1, row


def _hub_rows(hub: dict[str, Any], split: str) -> tuple[str, Rows]:
    datasets = import_datasets()
    hub_split = hub["splits"][split]
    ds = datasets.load_dataset(hub["path"], hub["name"], split=hub_split, revision=hub["revision"])
    label = f"hf://{hub['path']}" + (f"/{hub['name']}" if hub["name"] else "") + f"[{hub_split}]"
    return label, ((i + 1, dict(row)) for i, row in enumerate(ds))


def _scalar_text(obj: dict, name: str, source: str, line: int) -> str:
    """A column used as text: a string, or a number written as one (bools are not answers)."""
    value = require(obj, name, (str, int, float), source, line)
    if isinstance(value, bool):
        raise InputError("expected str or number, got bool", source, line, name)
    return value if isinstance(value, str) else str(value)


def parse_options(raw: Any, source: str, line: int, column: str) -> dict[str, str]:
    """An options column -> {"A": text, ...}.

    Accepted shapes: a list of texts (lettered A, B, ... in order), a list of `"A) text"` / `"(A) text"`
    strings, a list of `{"label", "text"}` objects, a mapping `{"A": text, ...}`, or the hub's
    `{"label": [...], "text": [...]}`.  Letters must run A, B, C, ... (2 to 5 options).
    """
    if isinstance(raw, dict) and isinstance(raw.get("label"), list) and isinstance(raw.get("text"), list):
        raw = [{"label": lab, "text": txt} for lab, txt in zip(raw["label"], raw["text"])]
    if isinstance(raw, dict):
        raw = [{"label": k, "text": v} for k, v in raw.items()]
    if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS):
        raise InputError(f"expected a list of 2-{len(LETTERS)} options, got {raw!r}", source, line, column)
    # Lettered strings only when every entry is one: a plain text may start like "A. Smith".
    lettered = all(isinstance(x, str) and _LETTERED.match(x) for x in raw)
    out: dict[str, str] = {}
    for want, item in zip(LETTERS, raw):
        if isinstance(item, dict):
            label, text = item.get("label"), item.get("text")
        elif lettered:
            m = _LETTERED.match(item)
            label, text = m.group(1), m.group(2)
        else:
            label, text = want, item
        if label != want or not isinstance(text, (str, int, float)) or isinstance(text, bool) or not str(text).strip():
            raise InputError(
                f"option {want}: expected a non-empty text labelled {want}, got {item!r}", source, line, column
            )
        out[want] = str(text).strip()
    return out


# ------------------------------------------------------------------------------------------- the task


def _ws(s: str) -> str:
    return " ".join(s.split())


class FileTask(DatasetTask):
    """A task read from a task file; `--task path/to/task.yaml` on every command builds one.

    Grading goes through the one `Task.grade` path: `extract_answer` and `answers_match` are chosen by the
    file's `answer_type`.  Constructor options, as for the built-in dataset tasks: `data_dir` (what
    `${AFTUNE_DATA}` in a data path stands for; default env AFTUNE_DATA) and `n_shot`.

    Example (from the repository root):
        >>> from aftune.tasks import get_task
        >>> task = get_task("configs/tasks/math_tiny.yaml")
        >>> ex = task.load("test")[0]
        >>> task.grade(ex.reference, ex).correct
        True
    """

    def __init__(self, path: str | os.PathLike, data_dir: str | os.PathLike | None = None, n_shot: int = 0):
        self.spec = read_task_spec(path)
        DatasetTask.__init__(self, data_dir, n_shot)
        self.name = self.spec.name
        self.description = self.spec.description
        self.splits = self.spec.splits
        self.stop = self.spec.stop
        uses_var = [s for s, f in self.spec.files.items() if f.startswith(DATA_VAR)]
        # The built-in tasks' order: data_dir, else AFTUNE_DATA, else the hub.
        self.use_hub = self.spec.hub is not None and (not self.spec.files or (uses_var and self.data_dir is None))
        if uses_var and self.data_dir is None and not self.use_hub:
            raise self.spec.error(
                f"data.{uses_var[0]}",
                f"uses {DATA_VAR}, but neither --data-dir (data_dir) nor the AFTUNE_DATA environment variable is set",
            )
        self._cache: dict[str, list[Example]] = {}
        markers = DEFAULT_MARKERS
        if self.spec.answer_from != "last_boxed" and self.spec.answer_marker not in markers:
            markers = (*markers, self.spec.answer_marker)  # the references' own marker counts as a final answer
        self._number_markers = markers

    # ---- data

    def data_file(self, split: str) -> Path:
        raw = self.spec.files[split]
        if raw.startswith(DATA_VAR):
            assert self.data_dir is not None  # checked in __init__
            return self.data_dir / raw[len(DATA_VAR) + 1 :]
        return Path(raw)

    def _rows(self, split: str) -> tuple[str, Rows]:
        if self.use_hub:
            return _hub_rows(self.spec.hub, split)
        path = self.data_file(split)
        if path.suffix.lower() == ".parquet":
            return str(path), parquet_rows(path)
        return str(path), iter_jsonl(path)

    def _load_file_split(self, split: str) -> list[Example]:
        if split not in self._cache:
            source, rows = self._rows(split)
            examples, seen = [], {}
            for i, (line, obj) in enumerate(rows):
                ex = self._parse(obj, source, line, split, i)
                if ex.id in seen:  # only possible with fields.id; sampling and merging key on ids
                    raise InputError(
                        f"duplicate id {ex.id!r} (first at line {seen[ex.id]})", source, line, self.spec.id_field
                    )
                seen[ex.id] = line
                examples.append(ex)
            self._cache[split] = examples
        return self._cache[split]

    def load(self, split: str) -> list[Example]:
        self.check_split(split)
        n = self.spec.validation_from_train
        if n and split in ("train", "validation"):
            train = self._load_file_split("train")
            if n >= len(train):
                raise self.spec.error(
                    "data.validation_from_train",
                    f"holding out {n} rows leaves no training rows (the train split has {len(train)})",
                )
            return list(train[:-n] if split == "train" else train[-n:])
        return list(self._load_file_split(split))

    def _parse(self, obj: dict, source: str, line: int, file_split: str, index: int) -> Example:
        spec = self.spec
        question = require(obj, spec.question_field, str, source, line)
        solution = require(obj, spec.solution_field, str, source, line) if spec.solution_field else None
        options = self._options(obj, source, line) if spec.answer_type == "choice" else None
        answer = self._gold(obj, solution, options, source, line)
        if spec.id_field is not None:
            ex_id = _scalar_text(obj, spec.id_field, source, line)
        else:
            ex_id = f"{spec.name}-{file_split}-{index}"
        values = {
            "question": question,
            "solution": solution or "",
            "answer": answer,
            "options": format_options(options or {}),
        }
        extra: dict[str, str] = {}
        for name in (*spec.prompt_fields, *spec.reference_fields):
            if name in ("question", "options", "solution", "answer") or name in extra:
                continue
            if name not in obj:
                raise InputError("missing field (a template of the task file uses {" + name + "})", source, line, name)
            extra[name] = _scalar_text(obj, name, source, line)
        reference = spec.reference.format_map({**extra, **values})
        # The prompt template's other columns ride along in meta, where prompt() reads them back.
        meta: dict[str, Any] = {"fields": extra} if extra else {}
        return Example(id=ex_id, question=question, reference=reference, answer=answer, options=options, meta=meta)

    def _options(self, obj: dict, source: str, line: int) -> dict[str, str]:
        col = self.spec.options_field
        if isinstance(col, tuple):
            out = {}
            for letter, c in zip(LETTERS, col):
                out[letter] = _scalar_text(obj, c, source, line).strip()
                if not out[letter]:
                    raise InputError(f"option {letter} is empty", source, line, c)
            return out
        return parse_options(require(obj, col, (list, dict), source, line), source, line, col)

    def _gold(self, obj: dict, solution: str | None, options: dict[str, str] | None, source: str, line: int) -> str:
        spec = self.spec
        if spec.answer_from == "field":
            column = spec.answer_field
            raw = _scalar_text(obj, column, source, line)
        elif spec.answer_from == "after_marker":
            column = spec.solution_field
            count = solution.count(spec.answer_marker)
            if count != 1:
                raise InputError(
                    f"expected the answer marker {spec.answer_marker!r} exactly once, found it {count} times",
                    source,
                    line,
                    column,
                )
            raw = solution.split(spec.answer_marker, 1)[1]
        else:
            column = spec.solution_field
            raw = extract_math_answer(solution, strict=True)
            if raw is None:
                raise InputError("expected a closed, non-empty \\boxed{...} answer", source, line, column)
        kind = spec.answer_type
        if kind == "number":
            gold = normalize_number(raw)
            if gold is None:
                raise InputError(f"expected a number as the answer, got {raw.strip()!r}", source, line, column)
        elif kind == "choice":
            gold = normalize_letter(raw)
            if gold is None or gold not in (options or {}):
                raise InputError(
                    f"expected one of the option letters {', '.join(options or {})}, got {raw.strip()!r}",
                    source,
                    line,
                    column,
                )
        else:
            gold = _ws(raw)
            if not gold:
                raise InputError("the answer is empty", source, line, column)
        return gold

    # ---- prompting and grading

    def zero_shot_prompt(self, example: Example) -> str:
        values = {**(example.meta.get("fields") or {}), "question": example.question}
        if "options" in self.spec.prompt_fields:
            values["options"] = format_options(example.options or {})
        return self.spec.prompt.format_map(values)

    def extract_answer(self, completion: str, example: Example | None = None, strict: bool = False) -> str | None:
        kind = self.spec.answer_type
        if kind == "number":
            if self.spec.answer_from == "last_boxed":
                boxed = extract_math_answer(completion, strict=True)
                if boxed is not None:
                    return normalize_number(boxed)
                if strict:
                    return None
            return extract_number(completion, strict=strict, markers=self._number_markers)
        if kind == "choice":
            return extract_choice(completion, strict=strict, options=example.options if example is not None else None)
        if kind == "math" or self.spec.answer_from == "last_boxed":
            return extract_math_answer(completion, strict=strict)
        return self._after_marker(completion, strict)

    def _after_marker(self, completion: str, strict: bool) -> str | None:
        """`exact`: the rest of the line after the last answer marker; flexible mode falls back to the last
        non-empty line when there is no marker."""
        if not isinstance(completion, str):
            return None
        pos = completion.rfind(self.spec.answer_marker)
        if pos >= 0:
            text = completion[pos + len(self.spec.answer_marker) :].lstrip(" \t:").split("\n", 1)[0]
        elif strict:
            return None
        else:
            text = next((ln for ln in reversed(completion.splitlines()) if ln.strip()), "")
        return _ws(text) or None

    def answers_match(self, predicted: str | None, gold: str) -> bool:
        if predicted is None:
            return False
        kind = self.spec.answer_type
        if kind == "number":
            return numbers_equal(predicted, gold)
        if kind == "choice":
            p, g = normalize_letter(predicted), normalize_letter(gold)
            return p is not None and p == g
        if kind == "math":
            return math_equal(gold, predicted)
        return _ws(predicted) == _ws(gold)


def describe_file(path: str | os.PathLike) -> Mapping[str, str]:
    """{"name", "description"} of a task file, read without touching its data."""
    spec = read_task_spec(path)
    return {"name": spec.name, "description": spec.description}
