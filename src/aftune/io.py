"""File I/O shared by every step: JSONL with precise errors, atomic writes, crash-safe appends.

Why: sampling and training run for hours; a kill must never leave a half-written report, and a
malformed user file must say exactly which file, line and field is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad user input. The message names the file, the line and the field."""

    def __init__(
        self, message: str, path: str | os.PathLike | None = None, line: int | None = None, field: str | None = None
    ):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        self.path, self.line, self.field = path, line, field
        # "<file>: line N: field 'x': message", the form editors and CI logs link to
        super().__init__(": ".join(where + [message]))


class RunError(RuntimeError):
    """A run stopped for a reason the user must act on (e.g. diverged training); the CLI prints it as
    one `error:` line instead of a traceback. Outputs already saved (checkpoints) are kept."""


def iter_jsonl(path: str | os.PathLike, *, drop_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-empty line.

    With drop_torn_tail, a final line without a newline that does not parse (a write cut by a kill)
    is skipped instead of raising; any other bad line raises InputError naming file and line.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist", path)
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    last = len(lines) - 1
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if drop_torn_tail and i == last:  # no trailing newline: a torn append
                return
            raise InputError(f"not valid JSON ({e})", path, i + 1) from None
        if not isinstance(obj, dict):
            raise InputError("expected a JSON object", path, i + 1)
        yield i + 1, obj


def require(obj: dict, field: str, types: type | tuple[type, ...], path: Any, line: int) -> Any:
    """Return obj[field], raising InputError (file, line, field) if missing or of the wrong type."""
    if field not in obj:
        raise InputError("missing field", path, line, field)
    value = obj[field]
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise InputError(f"expected {names}, got {type(value).__name__}", path, line, field)
    return value


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file that must hold an object (e.g. a .meta.json sidecar); errors name the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", path) from None
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object", path)
    return obj


def truncate_torn_tail(path: str | os.PathLike) -> int:
    """Cut a trailing partial line (no final newline) left by a killed append; returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return len(data) - keep


def append_jsonl(path: str | os.PathLike, objs: Iterable[dict]) -> None:
    """Append objects as lines and fsync, so a finished batch survives a kill."""
    payload = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)
    if not payload:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write-then-rename: readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, objs: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
