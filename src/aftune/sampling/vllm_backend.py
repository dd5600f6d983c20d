"""Optional `--backend vllm`: the same k samples per prompt, drawn by vLLM (GPU; `pip install aftune[vllm]`).

Scores use the model's raw (untempered) log-probabilities, as the HF sampler does: vLLM V1 returns those
by default (`logprobs_mode="raw_logprobs"`), and it is requested explicitly where the engine accepts it.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from aftune.sampling.sampler import Sample, SamplingConfig

INSTALL_HINT = (
    "the vLLM backend needs the optional dependency vllm (CUDA only): "
    "pip install 'aftune[vllm]'  (or use the default HF backend)"
)


def _import_vllm():
    try:
        import vllm  # noqa: F401  (heavy; only this backend needs it)
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} [import failed: {e}]") from e
    return LLM, SamplingParams


def _sample_from_output(completion: Any) -> Sample:
    token_ids = list(completion.token_ids)
    steps = completion.logprobs
    if steps is None:
        raise RuntimeError("vLLM returned no logprobs; SamplingParams(logprobs=0) is required for scores")
    # Each step maps token id -> Logprob; the sampled token is always included, even with logprobs=0.
    logprob_sum = sum(float(step[tid].logprob) for tid, step in zip(token_ids, steps))
    return Sample(text=completion.text, token_ids=token_ids, logprob_sum=logprob_sum, n_tokens=len(token_ids))


_ENGINES: dict = {}


def generate_k_vllm(
    model_path: str | os.PathLike,
    prompts: list[str],
    cfg: SamplingConfig,
    tensor_parallel_size: int = 1,
    **llm_kwargs: Any,
) -> list[list[Sample]]:
    """k samples per prompt with vLLM; same `Sample` semantics as `generate_k` (EOS in token_ids, not text)."""
    if cfg.calculator:
        raise ValueError(
            "the vLLM backend has no calculator for <<expr=>> annotations (this task uses one): sample with the "
            "built-in backend"
        )
    LLM, SamplingParams = _import_vllm()
    if not prompts:
        return []
    key = (str(model_path), tensor_parallel_size, tuple(sorted(llm_kwargs.items())))
    llm = _ENGINES.get(key)  # one engine per model: `aftune sample` calls this once per batch
    if llm is None:
        kwargs = {
            "model": str(model_path),
            "tensor_parallel_size": tensor_parallel_size,
            "seed": cfg.seed,
            "logprobs_mode": "raw_logprobs",
            **llm_kwargs,
        }
        try:
            llm = LLM(**kwargs)
        except TypeError:  # engines before logprobs_mode existed
            kwargs.pop("logprobs_mode")
            warnings.warn(
                "this vLLM version has no logprobs_mode; its V0 engine reports logprobs after "
                "temperature, so scores may differ from the HF backend's",
                stacklevel=2,
            )
            llm = LLM(**kwargs)
        _ENGINES[key] = llm
    params = SamplingParams(
        n=cfg.k,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_new_tokens,
        stop=list(cfg.stop) or None,
        seed=cfg.seed,
        logprobs=0,
    )
    outputs = llm.generate(list(prompts), params)
    return [[_sample_from_output(c) for c in out.outputs] for out in outputs]
