"""`aftune sft` and `aftune align`: build datasets and a Trainer from a config, train, save, report."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from aftune.config import AlignConfig, SFTConfig, TrainCommon, save_config
from aftune.io import InputError, atomic_write_json
from aftune.modeling import create_tiny
from aftune.records import Example, Group
from aftune.steps import load_examples, load_model_and_tokenizer, tasks_for  # one-line errors for bad --model
from aftune.tasks import Task
from aftune.training.data import AlignDataset, NLLDataset, collate, encode_pair
from aftune.training.methods import get_method
from aftune.training.trainer import AFTTrainer, AFTTrainingArguments


def load_split(tasks: list[Task], split: str, n: int | None = None) -> list[tuple[Task, Example]]:
    """Examples of every task (the first n of each), tagged with their task."""
    out = []
    for t in tasks:
        exs = load_examples(t, split)
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
        use_cpu=not torch.cuda.is_available(),
        # only when asked: the argument was renamed in transformers 5 (activation_checkpointing)
        **({"gradient_checkpointing": True} if cfg.gradient_checkpointing else {}),
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient each step (NLL term)
        **extra)


def _maybe_lora(model, cfg: TrainCommon):
    if cfg.lora_r <= 0:
        return model
    from aftune.distributed import wrap_lora

    return wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets.split(","))


def _save_model(trainer, tokenizer, out: Path, cfg: TrainCommon, base: str) -> Path:
    """OUT/model: a plain model eval/sample read. trainer.save_model gathers FSDP / ZeRO-3 shards and writes
    on the main process only; under LoRA it writes the adapter (OUT/adapter), merged here from disk."""
    from aftune.distributed import barrier, is_main_process, merge_adapter

    path = out / "model"
    if cfg.lora_r > 0:
        trainer.save_model(str(out / "adapter"))
        barrier()
        if is_main_process():
            merge_adapter(base, out / "adapter", path, tokenizer, cfg.trust_remote_code)
    else:
        trainer.save_model(str(path))  # weights + tokenizer (processing_class)
    barrier()
    return path


def _check_train_args(cfg: TrainCommon) -> None:
    for name in ("max_steps", "batch_size", "grad_accum", "save_steps", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise InputError(f"must be >= 1, got {getattr(cfg, name)}", field="--" + name.replace("_", "-"))
    if not cfg.lr > 0:
        raise InputError(f"must be > 0, got {cfg.lr}", field="--lr")


def _complete_checkpoint(path: Path) -> bool:
    # Trainer writes trainer_state.json last and in place, so a checkpoint whose state parses and names
    # its own step was written in full; one cut by a kill lacks it or holds a torn copy.
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and f"checkpoint-{state.get('global_step')}" == path.name


def _resume_point(cfg: TrainCommon, ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint. transformers' get_last_checkpoint takes the highest-numbered folder
    even when a kill cut it mid-write; torn ones are removed (they hold no usable state, and left in place
    they would be picked again, or rotated in place of good ones)."""
    if not (cfg.resume and ckpt_dir.exists()):
        return None
    while (last := get_last_checkpoint(str(ckpt_dir))) is not None:
        if _complete_checkpoint(Path(last)):
            return last
        print(f"aftune: removing incomplete checkpoint {last} (cut by a kill while saving)", file=sys.stderr)
        shutil.rmtree(last)
    return None


def _shared_resume_point(cfg: TrainCommon, ckpt_dir: Path) -> str | None:
    """_resume_point on the main process first (it may delete torn checkpoints), so all ranks agree."""
    from aftune.distributed import main_process_first

    with main_process_first():
        return _resume_point(cfg, ckpt_dir)


def _train_or_restore(trainer, resume: str | None) -> None:
    """trainer.train(), resuming from `resume`; but a checkpoint that already holds the last step (a kill
    after the final save, before the outputs were written) is restored, not resumed: transformers would
    run one step past max_steps."""
    from transformers.trainer_callback import TrainerState

    if resume is not None:
        state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        if trainer.is_world_process_zero():
            print(f"aftune: resuming from {resume} (step {state.global_step})", file=sys.stderr)
        if state.global_step >= trainer.args.max_steps:
            trainer.state = state
            trainer._load_from_checkpoint(resume)
            if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
                trainer._load_best_model()
            return
    trainer.train(resume_from_checkpoint=resume)


def run_sft(cfg: SFTConfig) -> dict:
    _check_train_args(cfg)
    out = Path(cfg.out)
    set_seed(cfg.seed)
    ckpt = out / "checkpoints"
    args = _training_args(cfg, ckpt, method="vft", eval_strategy="steps", eval_steps=cfg.eval_steps,
                          load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    args.save_steps = cfg.eval_steps  # best-checkpoint tracking needs saves on eval steps
    tasks = tasks_for(cfg)
    train = load_split(tasks, "train", cfg.n_train)
    val = load_split(tasks, "validation", cfg.n_validation)
    model_path = cfg.model
    if cfg.model == "tiny":
        from aftune.distributed import main_process_first

        init = out / "init"
        with main_process_first():  # built once; the other processes load it
            if not (init / "config.json").exists():
                texts = [t.prompt(e) + e.reference for t, e in train]
                # built aside, then renamed: a kill mid-build must not leave an init/ that has a
                # config.json (so is never rebuilt) but no tokenizer or weights
                tmp = out / ".init.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                create_tiny(tmp, texts, vocab_size=cfg.vocab_size, seed=cfg.seed, hidden_size=cfg.tiny_hidden,
                            n_layers=cfg.tiny_layers, n_heads=cfg.tiny_heads)
                shutil.rmtree(init, ignore_errors=True)
                tmp.rename(init)
        model_path = str(init)
    model, tok = load_model_and_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    save_config(cfg, out)  # only now: a bad --model or task leaves an existing OUT untouched
    model = _maybe_lora(model, cfg)
    train_ds = NLLDataset([encode_pair(tok, t.prompt(e), e.reference, cfg.max_response_tokens) for t, e in train])
    val_ds = NLLDataset([encode_pair(tok, t.prompt(e), e.reference, cfg.max_response_tokens) for t, e in val])
    callbacks = [EarlyStoppingCallback(cfg.patience)] if cfg.patience > 0 else []
    trainer = AFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         data_collator=partial(collate, pad_id=tok.pad_token_id), processing_class=tok, callbacks=callbacks)
    t0 = time.time()
    _train_or_restore(trainer, _shared_resume_point(cfg, ckpt))
    wall = time.time() - t0
    path = _save_model(trainer, tok, out, cfg, model_path)
    metrics = {"model": str(path), "train_seconds": round(wall, 1), "steps": trainer.state.global_step,
               "best_eval_loss": trainer.state.best_metric, "best_checkpoint": trainer.state.best_model_checkpoint,
               "n_train": len(train), "log_history": trainer.state.log_history}
    if not trainer.is_world_process_zero():
        return metrics
    if cfg.eval_accuracy:
        from aftune.evaluation.accuracy import greedy_accuracy

        # several processes: the weights may be sharded (FSDP / ZeRO-3), so read the saved model
        eval_model = trainer.model if args.world_size == 1 else load_model_and_tokenizer(str(path))[0].to(args.device)
        acc = greedy_accuracy(eval_model, tok, val, max_new_tokens=cfg.max_response_tokens,
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


def reference_logps(model, tokenizer, ds: AlignDataset, cache_dir: Path, key: str, batch_size: int = 16,
                    device: torch.device | str | None = None) -> None:
    """Summed log-probs of every selected candidate under the frozen start model (DPO's reference),
    computed once and cached on disk, so training holds one model in memory. Under several processes each
    scores its share of the questions (on `device`), the main process writes the file, and every rank
    receives all values."""
    from aftune.distributed import compute_once_sharded
    from aftune.scoring import score_groups

    def compute(indices: list[int]) -> list[list[float]]:
        values = []
        home = next(model.parameters()).device
        model.to(device or home).eval()
        with torch.no_grad():
            for i in range(0, len(indices), batch_size):
                items = [ds.items[j] for j in indices[i:i + batch_size]]
                s = score_groups(model, [it.prompt for it in items], [it.candidates for it in items], tokenizer.pad_token_id)
                flat = s.logp_sum.tolist()
                for it in items:
                    values.append(flat[:len(it.candidates)])
                    flat = flat[len(it.candidates):]
        model.to(home)
        return values

    path = cache_dir / f"reflogps-{key}.json"
    values = compute_once_sharded(path, len(ds.items), compute)
    if len(values) != len(ds.items) or any(len(v) != len(it.candidates) for v, it in zip(values, ds.items)):
        raise InputError("cached reference log-probs do not match the candidates (delete the file)", path)
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

    try:
        method = get_method(cfg.method)
    except ValueError as e:
        raise InputError(str(e), field="--method") from None
    if not (cfg.beta > 0 and cfg.dpo_beta > 0):  # `not >` also rejects NaN
        bad = "--beta" if not cfg.beta > 0 else "--dpo-beta"
        raise InputError(f"must be > 0, got {cfg.beta if bad == '--beta' else cfg.dpo_beta}", field=bad)
    _check_train_args(cfg)
    if cfg.max_candidates < 2:
        raise InputError(f"must be >= 2 to have anything to compare, got {cfg.max_candidates}", field="--max-candidates")
    out = Path(cfg.out)
    set_seed(cfg.seed)
    tasks = tasks_for(cfg)
    groups = read_groups(cfg.candidates)
    if not groups:
        raise InputError("no candidate groups (empty file)", cfg.candidates)
    names = {t.name for t in tasks}
    for i, g in enumerate(groups):
        if g.task not in names:
            raise InputError(f"candidates are for task '{g.task}', but --task is '{cfg.task}'", cfg.candidates, i + 1, "task")
    model, tok = load_model_and_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)  # only now: bad candidates or --model leave an existing OUT untouched
    held_out: list[Group] = []
    if cfg.diag_every > 0 and cfg.diag_candidates:
        held_out = read_groups(cfg.diag_candidates)[:cfg.diag_questions]
    elif cfg.diag_every > 0:
        held_out, groups = groups[-cfg.diag_questions:], groups[:-cfg.diag_questions]
    train = load_split(tasks, "train", cfg.n_train)
    pairs = [(t.prompt(e), e.reference) for t, e in train]
    if method.nll_data == "rft":
        pairs += rft_pairs(groups)
    nll = NLLDataset([encode_pair(tok, p, r, cfg.max_response_tokens) for p, r in pairs])
    ds = AlignDataset(tok, groups, nll, max_candidates=cfg.max_candidates, include_reference=cfg.include_reference,
                      max_response_tokens=cfg.max_response_tokens, seed=cfg.seed)
    ckpt = out / "checkpoints"
    args = _training_args(cfg, ckpt, method=cfg.method, beta=cfg.beta, lambda_=cfg.lambda_, dpo_beta=cfg.dpo_beta,
                          share_prefix=cfg.share_prefix)
    if method.needs_reference_logps:
        # before LoRA wraps the model: the reference is the base model (= the adapter disabled)
        key = hashlib.sha256(json.dumps([_file_hash(cfg.candidates), str(Path(cfg.model).resolve()), cfg.max_candidates,
                                         cfg.include_reference, cfg.max_response_tokens, cfg.seed]).encode()).hexdigest()[:16]
        reference_logps(model, tok, ds, Path(cfg.candidates).parent, key, device=args.device)
    model = _maybe_lora(model, cfg)
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
    _train_or_restore(trainer, _shared_resume_point(cfg, ckpt))
    wall = time.time() - t0
    path = _save_model(trainer, tok, out, cfg, cfg.model)
    metrics = {"model": str(path), "method": cfg.method, "train_seconds": round(wall, 1),
               "steps": trainer.state.global_step, "n_groups": len(groups), "n_nll_examples": len(nll),
               "log_history": trainer.state.log_history}
    if diag is not None:
        metrics["diagnostics"] = diag.history
        metrics["alarms"] = diag.alarms
    if trainer.is_world_process_zero():
        atomic_write_json(out / "metrics.json", metrics)
    return metrics
