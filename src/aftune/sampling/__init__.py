"""Sampling k candidate solutions per question (HF backend; optional vLLM backend in vllm_backend)."""

from aftune.records import read_groups
from aftune.sampling.sampler import Sample, SamplingConfig, generate_k
from aftune.sampling.store import sample_candidates

__all__ = ["Sample", "SamplingConfig", "generate_k", "read_groups", "sample_candidates"]
