"""What every command needs: models, tasks and examples loaded with one-line errors for bad input."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aftune.config import parse_task_args
from aftune.io import InputError
from aftune.modeling import load_for_inference, load_model_checked  # noqa: F401 - the commands import them from here
from aftune.records import Example, Group, read_groups
from aftune.tasks import Task, get_tasks


@contextlib.contextmanager
def input_errors(field: str | None = None, path=None, prefix: str = "") -> Iterator[None]:
    """Turn the library's ValueErrors (the user's input was wrong) into one-line InputErrors naming `field`."""
    try:
        yield
    except InputError:
        raise
    except ValueError as e:
        raise InputError(prefix + str(e), path, field=field) from None


def tasks_for(cfg) -> list[Task]:
    """The config's tasks; the registry's ValueErrors (unknown task or option) become one-line InputErrors."""
    with input_errors("--task"):
        return get_tasks(cfg.task, parse_task_args(cfg.task_args), cfg.data_dir)


def single_task(cfg) -> Task:
    tasks = tasks_for(cfg)
    if len(tasks) != 1:
        raise InputError(
            "sample one task per candidates file (mix them at `aftune align --candidates a,b`)", field="--task"
        )
    return tasks[0]


def load_examples(task: Task, split: str) -> list[Example]:
    with input_errors("--split", prefix=f"task '{task.name}': "):  # e.g. a split the task does not have
        return task.load(split)


def load_split(tasks: list[Task], split: str, n: int | None = None) -> list[tuple[Task, Example]]:
    """Examples of every task (the first n of each), tagged with their task."""
    out = []
    for t in tasks:
        exs = load_examples(t, split)
        if not exs:
            raise InputError(f"split '{split}' of task '{t.name}' is empty", field="--task")
        out += [(t, e) for e in (exs[:n] if n else exs)]
    return out


def read_candidate_files(spec: str) -> list[Group]:
    """Groups of one or several (comma separated) candidates files."""
    groups: list[Group] = []
    for path in [p.strip() for p in spec.split(",") if p.strip()]:
        groups += read_groups(path)
    return groups


def parse_shard(spec: str) -> tuple[int, int] | None:
    """'i/n' -> (i, n); '' -> None."""
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"expected i/n, got '{spec}'", field="--shard") from None
    if not 0 <= i < n:
        raise InputError(f"shard index must be in [0, {n}), got {i}", field="--shard")
    return i, n


def check_positive(cfg, names: tuple[str, ...]) -> None:
    """InputError naming the flag for every listed field that is set and < 1."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise InputError(f"must be >= 1, got {value}", field="--" + name.replace("_", "-"))
