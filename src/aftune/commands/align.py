"""`aftune align`: AFT (or a baseline) from the VFT model on a candidates file, with the task's NLL data."""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import set_seed

from aftune.commands.common import (
    check_positive,
    load_examples,
    load_model_checked,
    load_split,
    read_candidate_files,
    tasks_for,
)
from aftune.commands.training import (
    check_train_args,
    peft_config,
    save_model,
    shared_resume_point,
    train_or_restore,
    training_args,
)
from aftune.config import AlignConfig, save_config
from aftune.evaluation.diagnostics import DiagnosticsCallback
from aftune.io import InputError, atomic_write_json
from aftune.prompting import PromptFormat, resolve_prompt_format
from aftune.records import CandidatesMeta, Group, meta_path_for, read_groups
from aftune.sampling.arguments import sampling_config
from aftune.sampling.engines import resolve_training_backend
from aftune.training.compute import training_compute
from aftune.training.data import AlignDataset, NLLDataset, rft_pairs
from aftune.training.methods import get_method
from aftune.training.online import ResampleCallback, check_semi_online, resample_history
from aftune.training.trainer import AFTTrainer


def reference_cache(cfg: AlignConfig) -> Path:
    """Where the start model's log-probs of these candidates are cached: the candidates' folder. AFTTrainer
    names the file by the start weights' content, the selected candidates' token ids and the precision, so
    runs of one experiment that share candidates and a start model compute them once."""
    return Path(cfg.candidates).parent


def check_prompt_format(candidates: str, fmt: PromptFormat, tokenizer) -> None:
    """Candidates sampled with one prompt format cannot be trained with another: their prompts are stored
    rendered, and the NLL data and the response ends would not match them."""
    path = meta_path_for(candidates)
    if not path.exists():
        return  # labelled elsewhere (e.g. `aftune import` writes one; a hand-made file may not)
    was = CandidatesMeta.read(path).prompt_format or {"kind": "plain"}
    now = fmt.to_meta(tokenizer)
    if was != now:
        raise InputError(
            f"these candidates were sampled with prompt format {was} but this run uses {now}; "
            "pass the same --chat-template as `aftune sample`",
            path,
            field="prompt_format",
        )


def run_align(cfg: AlignConfig, callbacks: list | tuple = ()) -> dict:
    """Train, save OUT/model and OUT/metrics.json; `callbacks` are extra TrainerCallbacks."""
    method = get_method(cfg.method)  # AlignConfig checked the method fields when it was made
    check_train_args(cfg)
    check_positive(cfg, ("nll_per_question",))
    check_semi_online(method, cfg.beta_auto, int(os.environ.get("WORLD_SIZE", "1")), cfg.resample_every)
    if cfg.resample_every:
        if cfg.resample_k < 2:
            raise InputError(f"must be >= 2 to have anything to compare, got {cfg.resample_k}", field="--resample-k")
        check_positive(cfg, ("resample_max_new_tokens", "resample_batch_size"))
        resample_backend = resolve_training_backend(cfg.resample_backend, cfg.lora_r > 0, "--resample-backend")
    out = Path(cfg.out)
    set_seed(cfg.seed)
    tasks = tasks_for(cfg)
    groups = read_groups(cfg.candidates)
    if not groups:
        raise InputError("no candidate groups (empty file)", cfg.candidates)
    names = {t.name for t in tasks}
    for i, g in enumerate(groups):
        if g.task not in names:
            raise InputError(
                f"candidates are for task '{g.task}', but --task is '{cfg.task}'", cfg.candidates, i + 1, "task"
            )
    ckpt = out / "checkpoints"
    # before the model is loaded: under a ZeRO-3 DeepSpeed config from_pretrained then partitions the weights
    # as it reads them (no whole copy per process)
    args = training_args(cfg, ckpt)
    model, tok = load_model_checked(cfg.model, trust_remote_code=cfg.trust_remote_code)
    fmt = resolve_prompt_format(cfg.chat_template, tok)
    check_prompt_format(cfg.candidates, fmt, tok)
    end = fmt.response_end(tok)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)  # only now: bad candidates or --model leave an existing OUT untouched
    held_out: list[Group] = []
    if cfg.diag_every > 0 and cfg.diag_candidates:
        held_out = read_candidate_files(cfg.diag_candidates)[: cfg.diag_questions]
    elif cfg.diag_every > 0:
        held_out, groups = groups[-cfg.diag_questions :], groups[: -cfg.diag_questions]
    # the NLL term draws from the whole training set, not just the sampled questions
    pairs = [(fmt.render(tok, t.prompt(e)), e.reference) for t, e in load_split(tasks, "train", cfg.n_train)]
    if method.nll_data == "rft":
        pairs += rft_pairs(groups)  # the groups' prompts are already in the candidates' format
    nll = NLLDataset.from_texts(tok, pairs, cfg.max_response_tokens, end)
    ds = AlignDataset(
        tok,
        groups,
        nll,
        max_candidates=cfg.max_candidates,
        include_reference=cfg.include_reference,
        max_response_tokens=cfg.max_response_tokens,
        seed=cfg.seed,
        nll_per_item=cfg.nll_per_question,
        end=end,
    )
    diag = None
    extra = list(callbacks)
    if held_out:
        diag = DiagnosticsCallback(
            tok,
            held_out,
            every=cfg.diag_every,
            threshold=cfg.alarm_threshold,
            max_response_tokens=cfg.max_response_tokens,
            end=end,
        )
        extra.append(diag)
    resampler = None
    if cfg.resample_every:
        examples = {(t.name, e.id): (t, e) for t in tasks for e in load_examples(t, "train")}
        scfg = sampling_config(
            tasks, fmt, tok, cfg, prefix="resample_", seed=cfg.seed, batch_size=cfg.resample_batch_size
        )
        engine = None
        if resample_backend == "vllm":
            from aftune.modeling import resolve_model
            from aftune.sampling.vllm_backend import get_engine

            # beside the model being trained on one GPU: the engine takes a third of its memory (as TRL colocates)
            dtype = "bfloat16" if cfg.bf16 else "float32"
            engine = get_engine(resolve_model(cfg.model), tok, dtype, gpu_memory_utilization=0.3)
        resampler = ResampleCallback(
            tok,
            ds,
            examples,
            cfg.resample_every,
            scfg,
            out / "resample",
            cfg.max_candidates,
            cfg.include_reference,
            cfg.max_response_tokens,
            cfg.seed,
            end,
            engine=engine,
        )
        extra.append(resampler)
    trainer = AFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config(cfg),
        reference_cache=reference_cache(cfg),
        callbacks=extra,
    )
    if diag is not None:
        diag.trainer = trainer
    if resampler is not None:
        resampler.trainer = trainer
    t0 = time.time()
    train_or_restore(trainer, shared_resume_point(cfg, ckpt))
    wall = time.time() - t0
    path = save_model(trainer, tok, out, cfg, cfg.model)
    metrics = {
        "model": str(path),
        "method": cfg.method,
        "train_seconds": round(wall, 1),
        "steps": trainer.state.global_step,
        "n_groups": len(groups),
        "n_nll_examples": len(nll),
        "log_history": trainer.state.log_history,
        "compute": training_compute(trainer),
    }
    if cfg.resample_every:
        metrics["resample_every"] = cfg.resample_every
        metrics["resample_backend"] = resample_backend
        metrics["resamples"] = resample_history(out / "resample", cfg.resample_every, cfg.max_steps)
    if diag is not None:
        metrics["diagnostics"] = diag.history
        metrics["alarms"] = diag.alarms
    if trainer.is_world_process_zero():
        atomic_write_json(out / "metrics.json", metrics)
    return metrics
