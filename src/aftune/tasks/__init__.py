"""Task registry: `get_task("arith")`, `get_task("gsm8k", data_dir=...)`, `get_tasks("gsm8k,aqua")`.

Tasks are imported lazily so that using one never pays for (or fails on) another's dependencies.
"""

from __future__ import annotations

import importlib
import inspect

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


def get_task(name: str, **kwargs) -> Task:
    """One task by name, built with `kwargs` (e.g. `data_dir=...`, arith's `n_train=...`).

    Example:
        >>> from aftune import get_task
        >>> task = get_task("arith", n_train=20, n_validation=4, n_test=4)
        >>> ex = task.load("train")[0]
        >>> task.grade(ex.reference, ex).correct, task.stop
        (True, ('\\nQuestion:',))
    """
    return task_class(name)(**kwargs)


def get_tasks(spec: str, task_args: dict | None = None, data_dir: str | None = None) -> list[Task]:
    """'gsm8k,aqua' -> [GSM8KTask, AquaTask]. `task_args` go to every task that accepts them (with one task,
    an option it does not take is an error); `data_dir` to the dataset-backed tasks."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    tasks = []
    for name in names:
        cls = task_class(name)
        accepted = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in (task_args or {}).items() if k in accepted}
        unknown = set(task_args or {}) - set(accepted) if len(names) == 1 else set()
        if unknown:
            raise ValueError(f"task '{name}' has no option(s) {', '.join(sorted(unknown))}; "
                             f"it takes: {', '.join(accepted)}")
        if data_dir is not None and "data_dir" in accepted:
            kwargs["data_dir"] = data_dir
        tasks.append(cls(**kwargs))
    if not tasks:
        raise ValueError("no task given")
    return tasks


__all__ = ["Graded", "Task", "get_task", "get_tasks", "list_tasks", "register_task", "task_class"]
