"""Task registry: `get_task("arith")`, `get_task("gsm8k", data_dir=...)`, `get_tasks("gsm8k,aqua")`.

A name ending in `.yaml`/`.yml` is a task file (aftune.tasks.file_task, docs/task-files.md) instead of a
registered name: `get_task("configs/tasks/math_tiny.yaml")`, `get_tasks("gsm8k,my_task.yaml")`.
Tasks are imported lazily so that using one never pays for (or fails on) another's dependencies.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

from aftune.tasks.base import Graded, Task

_REGISTRY: dict[str, str] = {
    "arith": "aftune.tasks.arith:ArithTask",
    "gsm8k": "aftune.tasks.gsm8k:GSM8KTask",
    "aqua": "aftune.tasks.aqua:AquaTask",
    "ecqa": "aftune.tasks.ecqa:ECQATask",
}


def register_task(name: str, target: str) -> None:
    """Register a task class by import path ("package.module:Class"), so `--task name` finds it."""
    _REGISTRY[name] = target


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def task_class(name: str) -> type[Task]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(list_tasks())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _is_task_file(name: str) -> bool:
    return str(name).strip().lower().endswith((".yaml", ".yml"))


def _file_task_class() -> type[Task]:
    return importlib.import_module("aftune.tasks.file_task").FileTask


def get_task(name: str, **kwargs) -> Task:
    """One task by name or task-file path, built with `kwargs` (e.g. `data_dir=...`, arith's `n_train=...`).

    Example:
        >>> from aftune import get_task
        >>> task = get_task("arith", n_train=20, n_validation=4, n_test=4)
        >>> ex = task.load("train")[0]
        >>> task.grade(ex.reference, ex).correct, task.stop
        (True, ('\\nQuestion:',))
    """
    if _is_task_file(name):
        return _file_task_class()(name, **kwargs)
    return task_class(name)(**kwargs)


def get_tasks(spec: str, task_args: dict | None = None, data_dir: str | None = None) -> list[Task]:
    """'gsm8k,aqua' -> [GSM8KTask, AquaTask]; 'gsm8k,my_task.yaml' -> [GSM8KTask, FileTask]. `task_args` go to
    every task that accepts them (with one task, an option it does not take is an error); `data_dir` to the
    dataset-backed tasks (for a task file: what `${AFTUNE_DATA}` in its data paths stands for)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    tasks = []
    for name in names:
        is_file = _is_task_file(name)
        cls = _file_task_class() if is_file else task_class(name)
        accepted = {k: p for k, p in inspect.signature(cls).parameters.items() if not (is_file and k == "path")}
        kwargs = {k: v for k, v in (task_args or {}).items() if k in accepted}
        unknown = set(task_args or {}) - set(accepted) if len(names) == 1 else set()
        if unknown:
            raise ValueError(
                f"task '{name}' has no option(s) {', '.join(sorted(unknown))}; it takes: {', '.join(accepted)}"
            )
        if data_dir is not None and "data_dir" in accepted:
            kwargs["data_dir"] = data_dir
        tasks.append(cls(name, **kwargs) if is_file else cls(**kwargs))
    if not tasks:
        raise ValueError("no task given")
    seen: dict[str, str] = {}
    for name, task in zip(names, tasks):
        # Mixed tasks are told apart by name (candidate groups, per-task accuracy), e.g. a task file named
        # like a built-in task next to that task.
        if task.name in seen:
            raise ValueError(f"'{seen[task.name]}' and '{name}' are both task '{task.name}'; mix distinct tasks")
        seen[task.name] = name
    return tasks


@dataclass(frozen=True)
class TaskInfo:
    """One row of `describe_tasks`: what to pass as `--task`, the task's name and its description (or, for
    a task file that does not parse, the error in `error`)."""

    task: str
    name: str
    description: str
    error: str | None = None


def _repo_task_dirs() -> list[Path]:
    """configs/tasks/ of the current folder and of the source checkout this package runs from."""
    dirs = [Path("configs/tasks"), Path(__file__).resolve().parents[3] / "configs" / "tasks"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and all(d.resolve() != o.resolve() for o in out):
            out.append(d)
    return out


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when it is below it."""
    try:
        return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def describe_tasks(paths: list[str] | tuple[str, ...] = (), discover: bool = True) -> list[TaskInfo]:
    """The registered tasks, then the task files in `configs/tasks/` (when `discover`) and in `paths` (task
    files, or folders of them), each with its description. Task files are parsed, their data is not read;
    a file that does not parse is listed with its error, except a given path that does not exist (an
    InputError, as for `--task`).

    Example:
        >>> from aftune.tasks import describe_tasks
        >>> [t.task for t in describe_tasks(discover=False)]
        ['aqua', 'arith', 'ecqa', 'gsm8k']
    """
    from aftune.io import InputError
    from aftune.tasks.file_task import describe_file

    out = [TaskInfo(name, name, getattr(task_class(name), "description", "")) for name in list_tasks()]
    files: list[Path] = []
    for d in _repo_task_dirs() if discover else []:
        files += sorted(p for p in d.iterdir() if _is_task_file(p.name))
    for given in paths:
        p = Path(given)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if _is_task_file(f.name))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError("no such task file or folder", given)
    seen: set[Path] = set()
    for f in files:
        if f.resolve() in seen:
            continue
        seen.add(f.resolve())
        shown = _shown(f)
        try:
            info = describe_file(shown)
        except InputError as e:
            out.append(TaskInfo(shown, "", "", error=" ".join(str(e).split())))
            continue
        out.append(TaskInfo(shown, info["name"], info["description"]))
    return out


def format_task_list(infos: list[TaskInfo]) -> list[str]:
    """One line per task: the `--task` value, padded, then the description (a task file's own name first
    when it differs from its path's stem)."""
    width = max((len(t.task) for t in infos), default=0)
    lines = []
    for t in infos:
        if t.error is not None:
            text = f"INVALID: {t.error}"
        else:
            named = t.name != t.task and t.name != Path(t.task).stem
            text = (f"[{t.name}] " if named else "") + (t.description or "(no description)")
        lines.append(f"{t.task.ljust(width)}  {text}")
    return lines


__all__ = [
    "Graded",
    "Task",
    "TaskInfo",
    "describe_tasks",
    "format_task_list",
    "get_task",
    "get_tasks",
    "list_tasks",
    "register_task",
    "task_class",
]
