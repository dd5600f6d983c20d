"""Task registry: `get_task("arith")`, `get_task("gsm8k", data_dir=...)`.

Tasks are imported lazily so that using one never pays for (or fails on) another's dependencies.
"""

from __future__ import annotations

import importlib

from aftune.tasks.base import Task

_REGISTRY: dict[str, str] = {
    "arith": "aftune.tasks.arith:ArithTask",
    "gsm8k": "aftune.tasks.gsm8k:GSM8KTask",
    "aqua": "aftune.tasks.aqua:AquaTask",
    "ecqa": "aftune.tasks.ecqa:ECQATask",
}


def register_task(name: str, target: str) -> None:
    """Register a task class by import path ("package.module:Class")."""
    _REGISTRY[name] = target


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **kwargs) -> Task:
    if name not in _REGISTRY:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(list_tasks())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["Task", "get_task", "get_tasks", "list_tasks", "register_task"]


def get_tasks(spec: str, task_args: dict | None = None, data_dir: str | None = None) -> list[Task]:
    """'gsm8k,aqua' -> [GSM8KTask, AquaTask]. `task_args` go to every task that accepts them;
    `data_dir` to the dataset-backed tasks."""
    import inspect

    tasks = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name not in _REGISTRY:
            raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(list_tasks())}")
        module, cls_name = _REGISTRY[name].split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        accepted = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in (task_args or {}).items() if k in accepted}
        unknown = set(task_args or {}) - set(accepted) if len(spec.split(",")) == 1 else set()
        if unknown:
            raise ValueError(f"task '{name}' has no option(s) {', '.join(sorted(unknown))}; it takes: {', '.join(accepted)}")
        if data_dir is not None and "data_dir" in accepted:
            kwargs["data_dir"] = data_dir
        tasks.append(cls(**kwargs))
    if not tasks:
        raise ValueError("no task given")
    return tasks
