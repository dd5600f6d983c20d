"""What `aftune sft` and `aftune align` share: the config -> AFTConfig translation, checkpoint resume that
survives kills, and saving a plain model (LoRA merged) that every other command reads."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from aftune.commands.common import check_positive
from aftune.config import AlignConfig, TrainCommon
from aftune.distributed import barrier, is_main_process, lora_config, main_process_first, merge_adapter
from aftune.io import InputError
from aftune.training.config import AFTConfig
from aftune.training.zero import deepspeed_launch


def check_train_args(cfg: TrainCommon) -> None:
    check_positive(cfg, ("max_steps", "batch_size", "grad_accum", "save_steps", "logging_steps"))
    if not cfg.lr > 0:
        raise InputError(f"must be > 0, got {cfg.lr}", field="--lr")


def trainer_kwargs(cfg: TrainCommon, out_dir: Path) -> dict:
    """The `TrainingArguments` every training command shares (AFTConfig for sft / align, TRL's GRPOConfig)."""
    return dict(
        output_dir=str(out_dir),
        max_steps=cfg.max_steps,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=int(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_strategy="steps",
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        report_to=[r for r in cfg.report_to.split(",") if r and r != "none"] or "none",
        disable_tqdm=cfg.quiet,
        dataloader_num_workers=0,
        # DeepSpeed runs on its CPU accelerator where there is no GPU; use_cpu would make accelerate drop it
        use_cpu=not torch.cuda.is_available() and not (cfg.deepspeed or deepspeed_launch()),
        deepspeed=cfg.deepspeed or None,
        # only when asked: the argument was renamed in transformers 5 (activation_checkpointing)
        **({"gradient_checkpointing": True} if cfg.gradient_checkpointing else {}),
    )


def training_args(cfg: TrainCommon, out_dir: Path, **extra) -> AFTConfig:
    """The AFTConfig of a command's run: the shared training flags, the method's own (align), `extra`."""
    method = cfg.alignment_kwargs() if isinstance(cfg, AlignConfig) else {}
    return AFTConfig(
        **trainer_kwargs(cfg, out_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        max_response_tokens=cfg.max_response_tokens,
        ddp_find_unused_parameters=False,  # every trainable weight gets a gradient each step (NLL term)
        **{**method, **extra},
    )


def peft_config(cfg: TrainCommon):
    return lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_targets.split(",")) if cfg.lora_r > 0 else None


def save_model(trainer, tokenizer, out: Path, cfg: TrainCommon, base: str) -> Path:
    """OUT/model: a plain model eval/sample read. trainer.save_model gathers FSDP / ZeRO-3 shards and writes
    on the main process only; under LoRA it writes the adapter (OUT/adapter), merged here from disk."""
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


def complete_checkpoint(path: Path) -> bool:
    # Trainer writes trainer_state.json last and in place, so a checkpoint whose state parses and names
    # its own step was written in full; one cut by a kill lacks it or holds a torn copy.
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and f"checkpoint-{state.get('global_step')}" == path.name


def resume_point(cfg: TrainCommon, ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint. transformers' get_last_checkpoint takes the highest-numbered folder
    even when a kill cut it mid-write; torn ones are removed (they hold no usable state, and left in place
    they would be picked again, or rotated in place of good ones)."""
    if not (cfg.resume and ckpt_dir.exists()):
        return None
    while (last := get_last_checkpoint(str(ckpt_dir))) is not None:
        if complete_checkpoint(Path(last)):
            return last
        print(f"aftune: removing incomplete checkpoint {last} (cut by a kill while saving)", file=sys.stderr)
        shutil.rmtree(last)
    return None


def shared_resume_point(cfg: TrainCommon, ckpt_dir: Path) -> str | None:
    """resume_point on the main process first (it may delete torn checkpoints), so all ranks agree."""
    with main_process_first():
        return resume_point(cfg, ckpt_dir)


def train_or_restore(trainer, resume: str | None) -> None:
    """trainer.train(), resuming from `resume`; but a checkpoint that already holds the last step (a kill
    after the final save, before the outputs were written) is restored, not resumed: transformers would
    run one step past max_steps."""
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
