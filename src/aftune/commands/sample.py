"""`aftune sample`: k solutions per question from a model, labelled by the task's grader, in a resumable JSONL."""

from __future__ import annotations

from pathlib import Path

from aftune.commands.common import check_positive, load_examples, parse_shard, single_task
from aftune.config import SampleConfig, save_config
from aftune.distributed import env_shard
from aftune.io import InputError
from aftune.prompting import resolve_prompt_format
from aftune.sampling.arguments import sampling_config
from aftune.sampling.engines import BACKENDS, open_engine
from aftune.sampling.shards import shard_file
from aftune.sampling.store import sample_candidates


def run_sample(cfg: SampleConfig) -> dict:
    # Every check before any write, so a bad invocation leaves an existing candidates file as it was.
    if cfg.k < 2:
        raise InputError(f"k must be >= 2 to have anything to compare, got {cfg.k}", field="--k")
    check_positive(cfg, ("n_questions", "batch_size", "max_new_tokens"))
    if cfg.backend not in BACKENDS:
        raise InputError(f"unknown backend '{cfg.backend}' ({' | '.join(BACKENDS)})", field="--backend")
    task = single_task(cfg)
    examples = load_examples(task, cfg.split)
    if cfg.n_questions:
        examples = examples[: cfg.n_questions]
    if not examples:
        raise InputError(f"split '{cfg.split}' of task '{task.name}' is empty", field="--split")
    shard = parse_shard(cfg.shard or env_shard())  # under `accelerate launch`, one shard per process
    if shard is not None:
        examples = examples[shard[0] :: shard[1]]
    out = Path(cfg.out) if shard is None else shard_file(cfg.out, *shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    eng = open_engine(cfg.backend, cfg.model, cfg.inference_dtype, cfg.trust_remote_code)
    tok = eng.tokenizer
    fmt = resolve_prompt_format(cfg.chat_template, tok)
    scfg = sampling_config([task], fmt, tok, cfg, seed=cfg.seed, batch_size=cfg.batch_size)
    stats = sample_candidates(
        eng.model,
        tok,
        task,
        examples,
        out,
        scfg,
        model_name=cfg.model,
        progress=not cfg.quiet,
        generate=eng.generate,
        prompt_format=fmt,
        engine=eng.info,
    )
    stats["backend"] = eng.name
    # Saved once the file is complete: a run refused by the meta check must not overwrite the config
    # that produced the existing candidates.
    save_config(cfg, out.parent, f"{out.stem}.config.yaml")
    return stats
