"""`aftune align`: AFT (or a baseline) from the VFT model on a candidates file, with the task's NLL data."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from transformers import set_seed

from aftune.commands.common import load_model_and_tokenizer, load_split, read_candidate_files, tasks_for
from aftune.commands.training import (check_train_args, peft_config, save_model, shared_resume_point,
                                      train_or_restore, training_args)
from aftune.config import AlignConfig, save_config
from aftune.evaluation.diagnostics import DiagnosticsCallback
from aftune.io import InputError, atomic_write_json, file_sha256
from aftune.records import Group, read_groups
from aftune.training.data import AlignDataset, NLLDataset, rft_pairs
from aftune.training.methods import get_method
from aftune.training.trainer import AFTTrainer


def reference_cache(cfg: AlignConfig) -> Path:
    """Where the start model's log-probs of these candidates are cached: next to the candidates, keyed by
    everything they depend on, so runs of one experiment that share candidates compute them once."""
    key = hashlib.sha256(json.dumps([file_sha256(cfg.candidates), str(Path(cfg.model).resolve()), cfg.max_candidates,
                                     cfg.include_reference, cfg.max_response_tokens, cfg.seed]).encode()).hexdigest()
    return Path(cfg.candidates).parent / f"reflogps-{key[:16]}.json"


def run_align(cfg: AlignConfig, callbacks: list | tuple = ()) -> dict:
    """Train, save OUT/model and OUT/metrics.json; `callbacks` are extra TrainerCallbacks."""
    method = get_method(cfg.method)  # AlignConfig checked the method fields when it was made
    check_train_args(cfg)
    out = Path(cfg.out)
    set_seed(cfg.seed)
    tasks = tasks_for(cfg)
    groups = read_groups(cfg.candidates)
    if not groups:
        raise InputError("no candidate groups (empty file)", cfg.candidates)
    names = {t.name for t in tasks}
    for i, g in enumerate(groups):
        if g.task not in names:
            raise InputError(f"candidates are for task '{g.task}', but --task is '{cfg.task}'", cfg.candidates, i + 1,
                             "task")
    model, tok = load_model_and_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)  # only now: bad candidates or --model leave an existing OUT untouched
    held_out: list[Group] = []
    if cfg.diag_every > 0 and cfg.diag_candidates:
        held_out = read_candidate_files(cfg.diag_candidates)[:cfg.diag_questions]
    elif cfg.diag_every > 0:
        held_out, groups = groups[-cfg.diag_questions:], groups[:-cfg.diag_questions]
    # the NLL term draws from the whole training set, not just the sampled questions
    pairs = [(t.prompt(e), e.reference) for t, e in load_split(tasks, "train", cfg.n_train)]
    if method.nll_data == "rft":
        pairs += rft_pairs(groups)
    nll = NLLDataset.from_texts(tok, pairs, cfg.max_response_tokens)
    ds = AlignDataset(tok, groups, nll, max_candidates=cfg.max_candidates, include_reference=cfg.include_reference,
                      max_response_tokens=cfg.max_response_tokens, seed=cfg.seed)
    ckpt = out / "checkpoints"
    args = training_args(cfg, ckpt)
    diag = None
    extra = list(callbacks)
    if held_out:
        diag = DiagnosticsCallback(tok, held_out, every=cfg.diag_every, threshold=cfg.alarm_threshold,
                                   max_response_tokens=cfg.max_response_tokens)
        extra.append(diag)
    trainer = AFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config(cfg),
                         reference_cache=reference_cache(cfg), callbacks=extra)
    if diag is not None:
        diag.trainer = trainer
    t0 = time.time()
    train_or_restore(trainer, shared_resume_point(cfg, ckpt))
    wall = time.time() - t0
    path = save_model(trainer, tok, out, cfg, cfg.model)
    metrics = {"model": str(path), "method": cfg.method, "train_seconds": round(wall, 1),
               "steps": trainer.state.global_step, "n_groups": len(groups), "n_nll_examples": len(nll),
               "log_history": trainer.state.log_history}
    if diag is not None:
        metrics["diagnostics"] = diag.history
        metrics["alarms"] = diag.alarms
    if trainer.is_world_process_zero():
        atomic_write_json(out / "metrics.json", metrics)
    return metrics
