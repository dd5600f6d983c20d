"""`aftune sft` and `aftune align`: build datasets and a Trainer from a config, train, save, report."""

from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from aftune.config import AlignConfig, SFTConfig, TrainCommon, parse_task_args, save_config
from aftune.io import InputError, atomic_write_json
from aftune.modeling import create_tiny, load_model_and_tokenizer
from aftune.records import Example, Group
from aftune.tasks import Task, get_tasks
from aftune.training.data import AlignDataset, NLLDataset, collate, encode_pair
from aftune.training.methods import get_method
from aftune.training.trainer import AFTTrainer, AFTTrainingArguments


def load_split(tasks: list[Task], split: str, n: int | None = None) -> list[tuple[Task, Example]]:
    """Examples of every task (the first n of each), tagged with their task."""
    out = []
    for t in tasks:
        exs = t.load(split)
        if not exs:
            raise InputError(f"split '{split}' of task '{t.name}' is empty", field="--task")
        out += [(t, e) for e in (exs[:n] if n else exs)]
    return out


def _training_args(cfg: TrainCommon, out_dir: Path, **extra) -> AFTTrainingArguments:
    return AFTTrainingArguments(
        output_dir=str(out_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_schedule, warmup_steps=int(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_strategy="steps", save_total_limit=2, seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.bf16,
        report_to=[r for r in cfg.report_to.split(",") if r and r != "none"] or "none",
        disable_tqdm=cfg.quiet, remove_unused_columns=False, dataloader_num_workers=0,
        gradient_checkpointing=cfg.gradient_checkpointing, use_cpu=not torch.cuda.is_available(),
        **extra)


def _maybe_lora(model, cfg: TrainCommon):
    if cfg.lora_r <= 0:
        return model
    from aftune.distributed import wrap_lora

    return wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets.split(","))


def _save_model(trainer, tokenizer, out: Path, cfg: TrainCommon) -> Path:
    path = out / "model"
    model = trainer.model
    if cfg.lora_r > 0:
        trainer.save_model(str(out / "adapter"))
        model = model.merge_and_unload()  # eval/sample read a plain model
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def _resume_point(cfg: TrainCommon, ckpt_dir: Path) -> str | None:
    if cfg.resume and ckpt_dir.exists():
        return get_last_checkpoint(str(ckpt_dir))
    return None


def run_sft(cfg: SFTConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    set_seed(cfg.seed)
    tasks = get_tasks(cfg.task, parse_task_args(cfg.task_args), cfg.data_dir)
    train = load_split(tasks, "train", cfg.n_train)
    val = load_split(tasks, "validation", cfg.n_validation)
    model_path = cfg.model
    if cfg.model == "tiny":
        init = out / "init"
        if not (init / "config.json").exists():
            texts = [t.prompt(e) + e.reference for t, e in train]
            create_tiny(init, texts, vocab_size=cfg.vocab_size, seed=cfg.seed, hidden_size=cfg.tiny_hidden,
                        n_layers=cfg.tiny_layers, n_heads=cfg.tiny_heads)
        model_path = str(init)
    model, tok = load_model_and_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = _maybe_lora(model, cfg)
    train_ds = NLLDataset([encode_pair(tok, t.prompt(e), e.reference, cfg.max_response_tokens) for t, e in train])
    val_ds = NLLDataset([encode_pair(tok, t.prompt(e), e.reference, cfg.max_response_tokens) for t, e in val])
    ckpt = out / "checkpoints"
    args = _training_args(cfg, ckpt, method="vft", eval_strategy="steps", eval_steps=cfg.eval_steps,
                          load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    args.save_steps = cfg.eval_steps  # best-checkpoint tracking needs saves on eval steps
    callbacks = [EarlyStoppingCallback(cfg.patience)] if cfg.patience > 0 else []
    trainer = AFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         data_collator=partial(collate, pad_id=tok.pad_token_id), processing_class=tok, callbacks=callbacks)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=_resume_point(cfg, ckpt))
    wall = time.time() - t0
    path = _save_model(trainer, tok, out, cfg)
    metrics = {"model": str(path), "train_seconds": round(wall, 1), "steps": trainer.state.global_step,
               "best_eval_loss": trainer.state.best_metric, "best_checkpoint": trainer.state.best_model_checkpoint,
               "n_train": len(train), "log_history": trainer.state.log_history}
    if cfg.eval_accuracy:
        from aftune.evaluation.accuracy import greedy_accuracy

        acc = greedy_accuracy(trainer.model, tok, val, max_new_tokens=cfg.max_response_tokens,
                              batch_size=max(cfg.batch_size, 32), progress=not cfg.quiet)
        metrics["validation_accuracy"] = acc["accuracy"]
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def rft_pairs(groups: list[Group]) -> list[tuple[str, str]]:
    """RFT's extra NLL data: per question, distinct correct samples (one per equation list)."""
    from aftune.tasks.feedback import rft_select

    pairs = []
    for g in groups:
        correct = [c.text for c in g.candidates if c.correct and not c.is_reference]
        pairs += [(g.prompt, t) for t in rft_select(correct, kept=[g.reference])]
    return pairs


def reference_logps(model, tokenizer, ds: AlignDataset, cache_dir: Path, key: str, batch_size: int = 16) -> None:
    """Summed log-probs of every selected candidate under the frozen start model (DPO's reference),
    computed once and cached on disk, so training holds one model in memory."""
    from aftune.scoring import score_groups

    path = cache_dir / f"reflogps-{key}.json"
    if path.exists():
        values = json.loads(path.read_text())
    else:
        values = []
        model.eval()
        with torch.no_grad():
            for i in range(0, len(ds.items), batch_size):
                items = ds.items[i:i + batch_size]
                s = score_groups(model, [it.prompt for it in items], [it.candidates for it in items], tokenizer.pad_token_id)
                flat = s.logp_sum.tolist()
                for it in items:
                    values.append(flat[:len(it.candidates)])
                    flat = flat[len(it.candidates):]
        atomic_write_json(path, values)
    for it, v in zip(ds.items, values):
        it.ref_logps = v


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_align(cfg: AlignConfig) -> dict:
    from aftune.sampling.store import read_groups

    method = get_method(cfg.method)
    if cfg.beta <= 0 or cfg.dpo_beta <= 0:
        raise InputError("must be > 0", field="--beta" if cfg.beta <= 0 else "--dpo-beta")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    set_seed(cfg.seed)
    tasks = get_tasks(cfg.task, parse_task_args(cfg.task_args), cfg.data_dir)
    groups = read_groups(cfg.candidates)
    names = {t.name for t in tasks}
    for i, g in enumerate(groups):
        if g.task not in names:
            raise InputError(f"candidates are for task '{g.task}', but --task is '{cfg.task}'", cfg.candidates, i + 1, "task")
    model, tok = load_model_and_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    held_out: list[Group] = []
    if cfg.diag_every > 0:
        held_out, groups = groups[-cfg.diag_questions:], groups[:-cfg.diag_questions]
    train = load_split(tasks, "train", cfg.n_train)
    pairs = [(t.prompt(e), e.reference) for t, e in train]
    if method.nll_data == "rft":
        pairs += rft_pairs(groups)
    nll = NLLDataset([encode_pair(tok, p, r, cfg.max_response_tokens) for p, r in pairs])
    ds = AlignDataset(tok, groups, nll, max_candidates=cfg.max_candidates, include_reference=cfg.include_reference,
                      max_response_tokens=cfg.max_response_tokens, seed=cfg.seed)
    if method.needs_reference_logps:
        key = hashlib.sha256(json.dumps([_file_hash(cfg.candidates), str(Path(cfg.model).resolve()), cfg.max_candidates,
                                         cfg.include_reference, cfg.max_response_tokens, cfg.seed]).encode()).hexdigest()[:16]
        reference_logps(model, tok, ds, Path(cfg.candidates).parent, key)
    model = _maybe_lora(model, cfg)
    ckpt = out / "checkpoints"
    args = _training_args(cfg, ckpt, method=cfg.method, beta=cfg.beta, lambda_=cfg.lambda_, dpo_beta=cfg.dpo_beta,
                          share_prefix=cfg.share_prefix)
    callbacks = []
    diag = None
    if held_out:
        from aftune.training.diagnostics import DiagnosticsCallback

        diag = DiagnosticsCallback(tok, held_out, every=cfg.diag_every, threshold=cfg.alarm_threshold,
                                   max_response_tokens=cfg.max_response_tokens)
        callbacks.append(diag)
    trainer = AFTTrainer(model=model, args=args, train_dataset=ds, data_collator=partial(collate, pad_id=tok.pad_token_id),
                         processing_class=tok, callbacks=callbacks)
    if diag is not None:
        diag.trainer = trainer
    t0 = time.time()
    trainer.train(resume_from_checkpoint=_resume_point(cfg, ckpt))
    wall = time.time() - t0
    path = _save_model(trainer, tok, out, cfg)
    metrics = {"model": str(path), "method": cfg.method, "train_seconds": round(wall, 1),
               "steps": trainer.state.global_step, "n_groups": len(groups), "n_nll_examples": len(nll),
               "log_history": trainer.state.log_history}
    if diag is not None:
        metrics["diagnostics"] = diag.history
        metrics["alarms"] = diag.alarms
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
