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
from aftune.tasks import Task
from aftune.training.compute import training_compute
from aftune.training.data import AlignDataset, NLLDataset, rft_pairs
from aftune.training.methods import Method, get_method
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


def check_align_args(cfg: AlignConfig) -> tuple[Method, str | None]:
    """The checks that need no file or model, so a bad flag fails at once. Returns the method and the
    resolved --resample-backend (None without --resample-every)."""
    method = get_method(cfg.method)  # AlignConfig checked the method fields when it was made
    check_train_args(cfg)
    check_positive(cfg, ("nll_per_question",))
    check_semi_online(method, cfg.beta_auto, int(os.environ.get("WORLD_SIZE", "1")), cfg.resample_every)
    resample_backend = None
    if cfg.resample_every:
        if cfg.resample_k < 2:
            raise InputError(f"must be >= 2 to have anything to compare, got {cfg.resample_k}", field="--resample-k")
        check_positive(cfg, ("resample_max_new_tokens", "resample_batch_size"))
        resample_backend = resolve_training_backend(cfg.resample_backend, cfg.lora_r > 0, "--resample-backend")
    return method, resample_backend


def read_align_groups(cfg: AlignConfig, tasks: list[Task]) -> list[Group]:
    """The candidate groups, refused when empty or for a task other than --task's."""
    groups = read_groups(cfg.candidates)
    if not groups:
        raise InputError("no candidate groups (empty file)", cfg.candidates)
    names = {t.name for t in tasks}
    for i, g in enumerate(groups):
        if g.task not in names:
            raise InputError(
                f"candidates are for task '{g.task}', but --task is '{cfg.task}'", cfg.candidates, i + 1, "task"
            )
    return groups


def align_data(
    cfg: AlignConfig, method: Method, tasks: list[Task], groups: list[Group], tok, fmt: PromptFormat, end
) -> tuple[AlignDataset, list[Group]]:
    """The training data (candidates tokenised, each group with its NLL examples) and the held-out groups
    the diagnostics score: --diag-candidates, else the last --diag-questions groups, taken out of training."""
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
    return ds, held_out


def diagnostics_callback(cfg: AlignConfig, tok, held_out: list[Group], end) -> DiagnosticsCallback | None:
    """Assessment diagnostics and divergence alarms on the held-out groups every --diag-every steps."""
    if not held_out:
        return None
    return DiagnosticsCallback(
        tok,
        held_out,
        every=cfg.diag_every,
        threshold=cfg.alarm_threshold,
        max_response_tokens=cfg.max_response_tokens,
        end=end,
    )


def resample_callback(
    cfg: AlignConfig, tasks: list[Task], tok, fmt: PromptFormat, end, ds: AlignDataset, resample_backend: str | None
) -> ResampleCallback | None:
    """Semi-online training (--resample-every): fresh candidates from the model being trained, every N steps."""
    if not cfg.resample_every:
        return None
    examples = {(t.name, e.id): (t, e) for t in tasks for e in load_examples(t, "train")}
    scfg = sampling_config(tasks, fmt, tok, cfg, prefix="resample_", seed=cfg.seed, batch_size=cfg.resample_batch_size)
    engine = None
    if resample_backend == "vllm":
        from aftune.modeling import resolve_model
        from aftune.sampling.vllm_backend import get_engine

        # beside the model being trained on one GPU: the engine takes a third of its memory (as TRL colocates)
        dtype = "bfloat16" if cfg.bf16 else "float32"
        engine = get_engine(resolve_model(cfg.model), tok, dtype, gpu_memory_utilization=0.3)
    return ResampleCallback(
        tok,
        ds,
        examples,
        cfg.resample_every,
        scfg,
        Path(cfg.out) / "resample",
        cfg.max_candidates,
        cfg.include_reference,
        cfg.max_response_tokens,
        cfg.seed,
        end,
        engine=engine,
    )


def train_and_save(trainer: AFTTrainer, tok, cfg: AlignConfig, ckpt: Path, ds: AlignDataset) -> dict:
    """Train (resuming from the newest complete checkpoint), save OUT/model; the run's metrics so far."""
    t0 = time.time()
    train_or_restore(trainer, shared_resume_point(cfg, ckpt))
    wall = time.time() - t0
    path = save_model(trainer, tok, Path(cfg.out), cfg, cfg.model)
    return {
        "model": str(path),
        "method": cfg.method,
        "train_seconds": round(wall, 1),
        "steps": trainer.state.global_step,
        "n_groups": len(ds.groups),  # the training groups: without the held-out ones
        "n_nll_examples": len(ds.nll),
        "log_history": trainer.state.log_history,
        "compute": training_compute(trainer),
    }


def run_align(cfg: AlignConfig, callbacks: list | tuple = ()) -> dict:
    """Train, save OUT/model and OUT/metrics.json; `callbacks` are extra TrainerCallbacks.

    The recipe, one step per helper: check the flags, read the candidates, load the model, build the
    data and the callbacks, train and save."""
    method, resample_backend = check_align_args(cfg)
    out = Path(cfg.out)
    set_seed(cfg.seed)
    tasks = tasks_for(cfg)
    groups = read_align_groups(cfg, tasks)
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
    ds, held_out = align_data(cfg, method, tasks, groups, tok, fmt, end)
    diag = diagnostics_callback(cfg, tok, held_out, end)
    resampler = resample_callback(cfg, tasks, tok, fmt, end, ds, resample_backend)
    ours = [cb for cb in (diag, resampler) if cb is not None]
    trainer = AFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config(cfg),
        reference_cache=reference_cache(cfg),
        callbacks=[*callbacks, *ours],
    )
    for cb in ours:
        cb.trainer = trainer  # built before the trainer, they log (and count compute) through it
    metrics = train_and_save(trainer, tok, cfg, ckpt, ds)
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
