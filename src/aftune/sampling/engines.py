"""The one place a sampling engine is chosen: `--backend auto|hf|vllm`.

hf: aftune's built-in sampler (`generate_k`) on a Hugging Face model. vllm: the same draws through vLLM
(`vllm_backend`). auto: vLLM where it is installed and the model is large enough for its speed to pay for its
30-60 s start-up, else the built-in sampler. The cut-off follows the measurements in docs/performance.md: on
this kind of 2-core CPU vLLM sampled Gemma 3 270M (0.5 GB of bf16 weights) about 2x faster than the built-in
sampler, while a testbed model of a few MB samples in less time than vLLM takes to start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aftune.io import InputError
from aftune.sampling.arguments import BACKENDS
from aftune.sampling.sampler import Sample, SamplingConfig, generate_k

AUTO_VLLM_MIN_BYTES = 256 * 2**20  # weights at least this large: auto picks vLLM
log = logging.getLogger(__name__)


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) + sum(
        p.stat().st_size for p in folder.glob("*.bin")
    )


def resolve_backend(backend: str, model_name: str) -> str:
    """hf or vllm for `--backend` on `--model` (auto decided here; logged which one runs)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' ({' | '.join(BACKENDS)})", field="--backend")
    if backend != "auto":
        return backend
    from aftune.modeling import resolve_model
    from aftune.sampling import vllm_backend

    folder = Path(resolve_model(model_name))
    pick = "hf"
    if vllm_backend.available() and folder.is_dir() and _weight_bytes(folder) >= AUTO_VLLM_MIN_BYTES:
        pick = "vllm"
    log.info("--backend auto: sampling with %s", pick)
    return pick


def resolve_training_backend(backend: str, lora: bool = False, field: str = "--backend") -> str:
    """hf or vllm for sampling from a model that is being trained (semi-online resampling, GRPO rollouts).

    auto is the built-in sampler: it samples the live model, where vLLM would need the weights reloaded into its
    engine before every round. vllm is refused, in one line, where that reload cannot work (vLLM's CPU build; a
    LoRA-wrapped model, whose adapters load_weights does not merge)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' ({' | '.join(BACKENDS)})", field=field)
    if backend == "vllm":
        from aftune.sampling import vllm_backend

        why = vllm_backend.reload_unsupported()
        if why is None and lora:
            why = "the vLLM backend takes full weights, not LoRA adapters, while training"
        if why is not None:
            raise InputError(f"{why}; use {field} hf (or auto)", field=field)
        name = "vllm"
    else:
        name = "hf"
    log.info("%s %s: sampling from the model being trained with %s", field, backend, name)
    return name


class Engine:
    """A loaded sampling engine: `model` (the HF model; None for vLLM, which loads its own), `tokenizer`,
    `info` (what the candidates file's sidecar records) and `generate` (generate_k's contract)."""

    def __init__(self, name: str, model, tokenizer, info: dict[str, Any], vllm=None):
        self.name, self.model, self.tokenizer, self.info, self.vllm = name, model, tokenizer, info, vllm

    def generate(
        self,
        prompts: list[str],
        cfg: SamplingConfig,
        seeds: list[int] | None = None,
        on_done: Callable[[list[tuple[int, list[Sample]]]], None] | None = None,
        progress: bool = False,
    ) -> list[list[Sample]]:
        if self.vllm is not None:
            return self.vllm.generate(prompts, cfg, seeds=seeds, on_done=on_done, progress=progress)
        return generate_k(self.model, self.tokenizer, prompts, cfg, progress=progress, seeds=seeds, on_done=on_done)


def open_engine(
    backend: str, model_name: str, dtype: str = "float32", trust_remote_code: bool = False, **vllm_kwargs: Any
) -> Engine:
    """Load the engine `--backend` names for `--model` (auto resolved by resolve_backend)."""
    from aftune.modeling import load_for_inference, load_tokenizer, resolve_model

    name = resolve_backend(backend, model_name)
    if name == "vllm":
        from aftune.sampling.vllm_backend import get_engine

        if trust_remote_code:
            raise InputError("the vLLM backend runs with trust_remote_code off", field="--trust-remote-code")
        tok = load_tokenizer(model_name, trust_remote_code)  # aftune's prompt ids; vLLM gets ids, not text
        eng = get_engine(resolve_model(model_name), tok, dtype, **vllm_kwargs)
        return Engine("vllm", None, tok, dict(eng.info), eng)
    from aftune.sampling.store import builtin_engine_info

    model, tok = load_for_inference(model_name, dtype=dtype, trust_remote_code=trust_remote_code)
    return Engine("hf", model, tok, builtin_engine_info(model))
