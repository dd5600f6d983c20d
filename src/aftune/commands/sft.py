"""`aftune sft`: VFT, maximum likelihood on the reference solutions; the best checkpoint by eval loss is kept."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import EarlyStoppingCallback, set_seed

from aftune.commands.common import load_model_checked, load_split, tasks_for
from aftune.commands.training import (
    check_train_args,
    peft_config,
    save_model,
    shared_resume_point,
    train_or_restore,
    training_args,
)
from aftune.config import SFTConfig, save_config
from aftune.distributed import main_process_first
from aftune.evaluation.accuracy import greedy_accuracy
from aftune.io import atomic_write_json
from aftune.modeling import create_tiny
from aftune.prompting import resolve_prompt_format
from aftune.training.compute import training_compute
from aftune.training.data import NLLDataset
from aftune.training.trainer import AFTTrainer
from aftune.training.zero import whole_model_loading


def build_tiny(out: Path, cfg: SFTConfig, texts: list[str]) -> Path:
    """OUT/init: the from-scratch demo model and its tokenizer, built once (the other processes load it)."""
    init = out / "init"
    with main_process_first():
        if not (init / "config.json").exists():
            # built aside, then renamed: a kill mid-build must not leave an init/ that has a
            # config.json (so is never rebuilt) but no tokenizer or weights
            tmp = out / ".init.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            create_tiny(
                tmp,
                texts,
                vocab_size=cfg.vocab_size,
                seed=cfg.seed,
                hidden_size=cfg.tiny_hidden,
                n_layers=cfg.tiny_layers,
                n_heads=cfg.tiny_heads,
            )
            shutil.rmtree(init, ignore_errors=True)
            tmp.rename(init)
    return init


def run_sft(cfg: SFTConfig) -> dict:
    check_train_args(cfg)
    out = Path(cfg.out)
    set_seed(cfg.seed)
    ckpt = out / "checkpoints"
    args = training_args(
        cfg,
        ckpt,
        method="vft",
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
    )
    args.save_steps = cfg.eval_steps  # best-checkpoint tracking needs saves on eval steps
    tasks = tasks_for(cfg)
    train = load_split(tasks, "train", cfg.n_train)
    val = load_split(tasks, "validation", cfg.n_validation)
    model_path = cfg.model
    if cfg.model == "tiny":
        model_path = str(build_tiny(out, cfg, [t.prompt(e) + e.reference for t, e in train]))
    model, tok = load_model_checked(model_path, trust_remote_code=cfg.trust_remote_code)
    save_config(cfg, out)  # only now: a bad --model or task leaves an existing OUT untouched
    fmt = resolve_prompt_format(cfg.chat_template, tok)
    end = fmt.response_end(tok)
    train_ds = NLLDataset.from_texts(
        tok, [(fmt.render(tok, t.prompt(e)), e.reference) for t, e in train], cfg.max_response_tokens, end
    )
    val_ds = NLLDataset.from_texts(
        tok, [(fmt.render(tok, t.prompt(e)), e.reference) for t, e in val], cfg.max_response_tokens, end
    )
    callbacks = [EarlyStoppingCallback(cfg.patience)] if cfg.patience > 0 else []
    trainer = AFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tok,
        peft_config=peft_config(cfg),
        callbacks=callbacks,
    )
    t0 = time.time()
    train_or_restore(trainer, shared_resume_point(cfg, ckpt))
    wall = time.time() - t0
    path = save_model(trainer, tok, out, cfg, model_path)
    metrics = {
        "model": str(path),
        "train_seconds": round(wall, 1),
        "steps": trainer.state.global_step,
        "best_eval_loss": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "n_train": len(train),
        "log_history": trainer.state.log_history,
        "compute": training_compute(trainer),
    }
    if not trainer.is_world_process_zero():
        return metrics
    if cfg.eval_accuracy:
        # several processes: the weights may be sharded (FSDP / ZeRO-3), so read the saved model
        if args.world_size == 1:
            eval_model = trainer.model
        else:
            with whole_model_loading():  # the main process alone: not partitioned under a ZeRO-3 config
                eval_model = load_model_checked(str(path))[0].to(args.device)
        acc = greedy_accuracy(
            eval_model,
            tok,
            val,
            max_new_tokens=cfg.max_response_tokens,
            batch_size=max(cfg.batch_size, 32),
            progress=not cfg.quiet,
            prompt_format=fmt,
        )
        metrics["validation_accuracy"] = acc["accuracy"]
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
