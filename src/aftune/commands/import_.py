"""`aftune import`: a TRL-style dataset (unpaired `prompt`/`completion`/`label`, or preference
`prompt`/`chosen`/`rejected`, Parquet or JSONL) as a candidates file + `.meta.json` that `aftune align`
trains on. (`import` is a Python keyword, hence the module's name.)"""

from __future__ import annotations

from typing import Any

from aftune.config import ImportConfig
from aftune.interop import import_dataset
from aftune.io import InputError


def run_import_(cfg: ImportConfig) -> dict[str, Any]:
    if not cfg.dataset:
        raise InputError("give the dataset to import (a .parquet or .jsonl file, or a folder)", field="--dataset")
    if not cfg.out:
        raise InputError("give the candidates file to write", field="--out")
    if cfg.task is not None and not cfg.task.strip():
        raise InputError("must name a task", field="--task")
    stats = import_dataset(cfg.dataset, cfg.out, cfg.task)
    return {"out": cfg.out, **{k: v for k, v in stats.items() if k != "note"}}
