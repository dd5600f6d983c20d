"""Where benchmark data comes from: a local data directory or the Hugging Face hub.

Resolution order for a task's data: the `data_dir` argument, else env `AFTUNE_DATA`, else the hub
(through the optional `datasets` package, imported only then).  Local files use the layout of
`shared/data` (see docs/tasks.md); hub rows are handed to the same record parsers as local lines, so
both paths grade identically.

Also holds `DatasetTask`, the base of the benchmark tasks: split checking and few-shot prompts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aftune.io import InputError, iter_jsonl
from aftune.records import Example
from aftune.tasks.base import Task

DATA_ENV = "AFTUNE_DATA"

# (dataset id, config) per task; ECQA's explanations are not on the hub, only CommonsenseQA.
HUB_IDS: dict[str, tuple[str, str | None]] = {
    "gsm8k": ("openai/gsm8k", "main"),
    "aqua": ("deepmind/aqua_rat", "raw"),
    "ecqa": ("tau/commonsense_qa", None),
}

Rows = Iterator[tuple[int, dict[str, Any]]]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local data root to use, or None for the hub."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV) or None
    if data_dir is None:
        return None
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(
            "data directory does not exist (set data_dir or AFTUNE_DATA, or unset both to use the Hugging Face hub)",
            root,
        )
    return root


def import_datasets() -> Any:
    try:
        import datasets  # noqa: PLC0415 - optional dependency, only needed without local data
    except ImportError:
        raise ImportError(
            "loading from the Hugging Face hub needs the 'datasets' package "
            "(pip install 'aftune[hub]'), or point data_dir / AFTUNE_DATA at a local copy"
        ) from None
    return datasets


def hub_rows(task: str, split: str) -> tuple[str, Rows]:
    """(source label for error messages, (row number, row) pairs) of one hub split."""
    dataset_id, config = HUB_IDS[task]
    datasets = import_datasets()
    ds = datasets.load_dataset(dataset_id, config, split=split)
    label = f"hf://{dataset_id}" + (f"/{config}" if config else "") + f"[{split}]"
    return label, ((i + 1, dict(row)) for i, row in enumerate(ds))


def local_rows(path: Path) -> tuple[str, Rows]:
    return str(path), iter_jsonl(path)


class DatasetTask(Task):
    """A task backed by a dataset: `data_dir` / env / hub resolution and few-shot prompts.

    Few-shot exemplars are the first `n_shot` examples of the train split (an exemplar identical to
    the prompted example is skipped), each shown as its zero-shot prompt plus its reference.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, n_shot: int = 0):
        if not isinstance(n_shot, int) or n_shot < 0:
            raise ValueError(f"n_shot must be a non-negative integer, got {n_shot!r}")
        self.data_dir = resolve_data_dir(data_dir)
        self.n_shot = n_shot
        self._fewshot: list[Example] | None = None

    def local_path(self, relative: str) -> Path:
        assert self.data_dir is not None
        return self.data_dir / relative

    @property
    def fewshot(self) -> list[Example]:
        """Candidate exemplars (n_shot + 1, so one can be dropped), loaded on first use."""
        if self.n_shot == 0:
            return []
        if self._fewshot is None:
            self._fewshot = self.load("train")[: self.n_shot + 1]
        return self._fewshot

    def zero_shot_prompt(self, example: Example) -> str:
        return Task.prompt(self, example)

    def prompt(self, example: Example) -> str:
        shots = [e for e in self.fewshot if e.id != example.id][: self.n_shot]
        head = "".join(f"{self.zero_shot_prompt(e)}{e.reference}\n\n" for e in shots)
        return head + self.zero_shot_prompt(example)
