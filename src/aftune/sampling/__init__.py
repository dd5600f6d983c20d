"""Sampling k candidate solutions per question (HF backend; optional vLLM backend in vllm_backend).

The names below load on first use, so `aftune.sampling.arguments` (the sampling options the CLI reads before it
loads anything heavy) can be imported without torch.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "read_groups": "aftune.records",
    "Sample": "aftune.sampling.sampler",
    "SamplingConfig": "aftune.sampling.sampler",
    "generate_k": "aftune.sampling.sampler",
    "sample_candidates": "aftune.sampling.store",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
