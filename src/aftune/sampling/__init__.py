"""Sampling k candidate solutions per question (HF backend; optional vLLM backend)."""

from aftune.sampling.sampler import Sample, SamplingConfig, generate_k

__all__ = ["Sample", "SamplingConfig", "generate_k"]
