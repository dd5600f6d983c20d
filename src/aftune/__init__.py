"""aftune: Alignment Fine-Tuning (AFT) for chain-of-thought reasoners.

Data flows one way: tasks -> records -> sampling -> scoring/losses -> training -> evaluation, and the
commands (aftune.commands, the `aftune` CLI) sit on top.

    >>> from aftune import AFTConfig, AFTTrainer, get_task, read_groups

Names are loaded on first use, so `import aftune` stays cheap (torch is imported only when needed).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The one list of public names: these imports, which type checkers and editors read (`X as X` marks a
# re-export). At run time nothing here is imported: `_EXPORTS` and `__all__` are read from this block, so the
# three cannot disagree.
if TYPE_CHECKING:
    from aftune import losses as losses
    from aftune.evaluation.accuracy import greedy_accuracy as greedy_accuracy
    from aftune.evaluation.assessment import assessment_metrics as assessment_metrics
    from aftune.modeling import load_model_and_tokenizer as load_model_and_tokenizer
    from aftune.records import Candidate as Candidate
    from aftune.records import CandidatesMeta as CandidatesMeta
    from aftune.records import Example as Example
    from aftune.records import Group as Group
    from aftune.records import read_groups as read_groups
    from aftune.sampling.sampler import SamplingConfig as SamplingConfig
    from aftune.sampling.sampler import generate_k as generate_k
    from aftune.sampling.store import sample_candidates as sample_candidates
    from aftune.scoring import score_groups as score_groups
    from aftune.tasks import Task as Task
    from aftune.tasks import get_task as get_task
    from aftune.tasks import get_tasks as get_tasks
    from aftune.tasks import register_task as register_task
    from aftune.training.config import AFTConfig as AFTConfig
    from aftune.training.data import AlignDataset as AlignDataset
    from aftune.training.data import NLLDataset as NLLDataset
    from aftune.training.data import groups_from_unpaired as groups_from_unpaired
    from aftune.training.trainer import AFTTrainer as AFTTrainer


def _read_exports() -> dict[str, str]:
    """{public name: module that defines it}, from the `if TYPE_CHECKING:` imports of this file."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    out = {}
    for stmt in block.body:
        if not isinstance(stmt, ast.ImportFrom) or stmt.level:
            raise ImportError(
                f"aftune/__init__.py: the TYPE_CHECKING block takes only `from aftune... import`, line {stmt.lineno}"
            )
        for alias in stmt.names:
            # `from aftune import losses` names a submodule: it is imported as `aftune.losses`
            out[alias.asname or alias.name] = f"{stmt.module}.{alias.name}" if stmt.module == __name__ else stmt.module
    return out


_EXPORTS = _read_exports()
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    raise AttributeError(f"module 'aftune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
