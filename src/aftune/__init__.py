"""aftune: Alignment Fine-Tuning (AFT) for chain-of-thought reasoners.

Data flows one way: tasks -> records -> sampling -> scoring/losses -> training -> evaluation, and the
commands (aftune.commands, the `aftune` CLI) sit on top.

    >>> from aftune import AFTConfig, AFTTrainer, get_task, read_groups

Names are loaded on first use, so `import aftune` stays cheap (torch is imported only when needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AFTConfig": "aftune.training.config",
    "AFTTrainer": "aftune.training.trainer",
    "AlignDataset": "aftune.training.data",
    "NLLDataset": "aftune.training.data",
    "groups_from_unpaired": "aftune.training.data",
    "Candidate": "aftune.records",
    "CandidatesMeta": "aftune.records",
    "Example": "aftune.records",
    "Group": "aftune.records",
    "read_groups": "aftune.records",
    "Task": "aftune.tasks",
    "get_task": "aftune.tasks",
    "get_tasks": "aftune.tasks",
    "register_task": "aftune.tasks",
    "SamplingConfig": "aftune.sampling.sampler",
    "generate_k": "aftune.sampling.sampler",
    "sample_candidates": "aftune.sampling.store",
    "score_groups": "aftune.scoring",
    "greedy_accuracy": "aftune.evaluation.accuracy",
    "assessment_metrics": "aftune.evaluation.assessment",
    "load_model_and_tokenizer": "aftune.modeling",
}
__all__ = [
    "__version__",
    "losses",
    "AFTConfig",
    "AFTTrainer",
    "AlignDataset",
    "NLLDataset",
    "groups_from_unpaired",
    "Candidate",
    "CandidatesMeta",
    "Example",
    "Group",
    "read_groups",
    "Task",
    "get_task",
    "get_tasks",
    "register_task",
    "SamplingConfig",
    "generate_k",
    "sample_candidates",
    "score_groups",
    "greedy_accuracy",
    "assessment_metrics",
    "load_model_and_tokenizer",
]

if TYPE_CHECKING:
    from aftune import losses
    from aftune.evaluation.accuracy import greedy_accuracy
    from aftune.evaluation.assessment import assessment_metrics
    from aftune.modeling import load_model_and_tokenizer
    from aftune.records import Candidate, CandidatesMeta, Example, Group, read_groups
    from aftune.sampling.sampler import SamplingConfig, generate_k
    from aftune.sampling.store import sample_candidates
    from aftune.scoring import score_groups
    from aftune.tasks import Task, get_task, get_tasks, register_task
    from aftune.training.config import AFTConfig
    from aftune.training.data import AlignDataset, NLLDataset, groups_from_unpaired
    from aftune.training.trainer import AFTTrainer


def __getattr__(name: str) -> Any:
    if name == "losses":
        return importlib.import_module("aftune.losses")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aftune' has no attribute {name!r}")
