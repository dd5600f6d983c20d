"""AFTTrainer: a thin `transformers.Trainer` subclass. The loss lives in aftune.losses; the trainer only wires
tokenised batch -> scores -> loss. accelerate / DeepSpeed / FSDP, PEFT, logging and resume come from Trainer."""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer

from aftune.io import RunError
from aftune.modeling import ensure_pad_token, load_model, load_tokenizer
from aftune.prompting import PLAIN, PromptFormat
from aftune.scoring import score_groups, to_padded
from aftune.training.compute import ComputeCounter, candidate_tokens, find_counter
from aftune.training.config import AFTConfig
from aftune.training.data import AlignDataset, NLLDataset, collate, default_nll_pairs, to_groups
from aftune.training.fsdp import attach_fsdp_on_cpu
from aftune.training.methods import CandidateBatch, get_method
from aftune.training.reference import cache_path, question_betas, reference_logps
from aftune.training.zero import weights_digest

# the metrics compute_loss records, in one fixed order so that processes can average them together
METRICS = ("nll", "align_loss", "score_pos", "score_neg")


def check_trainer_hooks() -> None:
    """Fail loudly on a transformers whose Trainer lacks the hooks AFTTrainer relies on. Without
    `loss_is_scaled_for_ga` read in `training_step`, Trainer divides the step-normalised loss by the
    accumulation steps once more, without any error; without `_prepare_for_training` the DPO reference would
    not be computed by the training engine."""
    step = getattr(Trainer, "training_step", None)
    if "loss_is_scaled_for_ga" not in getattr(getattr(step, "__code__", None), "co_names", ()):
        raise RuntimeError(
            "this transformers Trainer does not honour `loss_is_scaled_for_ga` (its training_step never reads "
            "it), so gradient accumulation would be scaled twice; upgrade transformers (aftune is tested with 5.19)"
        )
    if not callable(getattr(Trainer, "_prepare_for_training", None)):
        raise RuntimeError(
            "this transformers Trainer has no `_prepare_for_training`, where AFTTrainer computes the DPO "
            "reference with the training engine; upgrade transformers (aftune is tested with 5.19)"
        )


class TrainingDiverged(RunError):
    """Raised when the loss or the scores stop being finite; the last saved checkpoint is kept."""


class AFTTrainer(Trainer):
    """Alignment Fine-Tuning (and every baseline aftune implements) as a `transformers.Trainer`.

    Args:
        model: a causal LM, or a local path / hub id to load one from (safetensors, no remote code).
        args: an `AFTConfig` (method, beta, lambda_, ... plus every `TrainingArguments` field).
        train_dataset: grouped candidates, as any of: a candidates JSONL path (`aftune sample`'s output), a
            list of `aftune.Group`, a `datasets.Dataset` / list of dicts in TRL's unpaired-preference format
            (`prompt`, `completion`, `label`: rows sharing a prompt form one question, `label` True = a
            correct solution), or of candidates records. Already tokenised `AlignDataset` / `NLLDataset`
            objects are used as they are.
        processing_class: the tokenizer (loaded from `model` when that is a path).
        peft_config: a `peft` config (e.g. `LoraConfig`); the DPO reference is the base model (the adapter
            disabled while it is scored).
        nll_dataset: the L_VFT term's data, as (prompt, response) text pairs or a dataset with `prompt` and
            `completion` columns. Default: each group's reference, or its correct candidates if it has none.
        reference_cache: where the reference log-probs are cached: a folder (default: `args.output_dir`) for
            `reflogps-<key>.json`, the key a hash of the start weights, the candidates and the precision, or a
            `.json` file used as given. Computed once (each process scores its share), read back on resume.
        prompt_format: an `aftune.prompting.PromptFormat` when the prompts are chat-rendered: responses then
            end with the template's turn end instead of EOS (the prompts themselves are used as given).

    The trainer tokenises the groups, builds its collator, keeps its columns whatever
    `remove_unused_columns` says, and computes the reference log-probs (DPO) and the per-question beta
    (`beta_auto="gap"`) with the start model when training starts, through the prepared training engine.

    Example:
        >>> from datasets import Dataset
        >>> from aftune import AFTConfig, AFTTrainer
        >>> ds = Dataset.from_list([
        ...     {"prompt": "Question: 2 + 3?\\nAnswer:\\n", "completion": "2 + 3 = 5\\n#### 5", "label": True},
        ...     {"prompt": "Question: 2 + 3?\\nAnswer:\\n", "completion": "2 + 3 = 6\\n#### 6", "label": False}])
        >>> trainer = AFTTrainer(model="path/to/vft-model", train_dataset=ds,
        ...                      args=AFTConfig(output_dir="out", method="bc", beta=0.5, max_steps=10))
        >>> trainer.train()  # doctest: +SKIP
    """

    # compute_loss normalises by the whole optimiser step's counts (see _get_num_items_in_batch)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args: AFTConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class=None,
        peft_config=None,
        nll_dataset: Any = None,
        reference_cache: str | os.PathLike | None = None,
        prompt_format: PromptFormat | None = None,
        data_collator=None,
        **kwargs,
    ):
        check_trainer_hooks()
        if isinstance(model, (str, os.PathLike)):
            processing_class = processing_class or load_tokenizer(str(model))
            model = load_model(str(model))
        if processing_class is None:
            raise ValueError("AFTTrainer needs processing_class (the tokenizer) when model is an object")
        ensure_pad_token(processing_class)  # the collator and scoring pad with it, as load_tokenizer's would
        if args is None:
            args = AFTConfig(output_dir="aftune-output")
        if not isinstance(args, AFTConfig):
            raise TypeError(f"args must be an AFTConfig, got {type(args).__name__}")
        self.method = get_method(args.method)
        end = (prompt_format or PLAIN).response_end(processing_class)
        train_dataset = self._tokenised(train_dataset, processing_class, args, nll_dataset, end, "train_dataset")
        eval_dataset = self._tokenised(eval_dataset, processing_class, args, nll_dataset, end, "eval_dataset")
        # the reference is computed when training starts (_prepare_for_training), by the prepared engine; the
        # cache file is named now, by the start weights (under ZeRO-3 gathered one parameter at a time)
        pending: list[tuple[AlignDataset, Any]] = []
        if self.method.needs_reference_logps or args.beta_auto:
            todo = [
                ds
                for ds in (train_dataset, eval_dataset)
                if isinstance(ds, AlignDataset) and any(it.ref_logps is None for it in ds.items)
            ]
            digest = weights_digest(model) if todo else ""
            precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
            for ds in todo:
                where = reference_cache if ds is train_dataset and reference_cache is not None else args.output_dir
                pending.append((ds, cache_path(where, digest, ds, precision)))
            for ds in (train_dataset, eval_dataset):
                if isinstance(ds, AlignDataset) and ds not in todo and args.beta_auto == "gap":
                    question_betas(ds, args.beta, args.beta_floor)
        if peft_config is not None:
            from peft import get_peft_model  # optional dependency (the `lora` extra)

            model = get_peft_model(model, peft_config)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator or partial(collate, pad_id=processing_class.pad_token_id),
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False  # the model is never given num_items_in_batch
        if find_counter(self) is None:  # tokens scored, saved in checkpoints (aftune.training.compute)
            self.add_callback(ComputeCounter())
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._pending_references = pending

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self._compute_references(model, resumed=resume_from_checkpoint is not None)
        return model, train_dataloader

    def evaluate(self, *args, **kwargs):
        if self._pending_references:  # evaluated before training: the weights are still the start model's
            self._compute_references(self.model_wrapped, resumed=self.state.global_step > 0)
        return super().evaluate(*args, **kwargs)

    def _compute_references(self, model, resumed: bool) -> None:
        """The start model's log-probs of the candidates, by `model` (the prepared engine): the cache when it
        exists, else computed now; a resumed run's weights are trained, so only LoRA (whose base is frozen:
        the adapter is disabled) may compute them then."""
        unwrapped = self.accelerator.unwrap_model(model)
        lora = callable(getattr(unwrapped, "disable_adapter", None))
        context = unwrapped.disable_adapter if lora else contextlib.nullcontext
        for ds, path in self._pending_references:
            reference_logps(
                model,
                self.processing_class,
                ds,
                path,
                batch_size=self.args.per_device_train_batch_size,
                context=context,
                may_compute=lora or not resumed,
            )
            if self.args.beta_auto == "gap":
                question_betas(ds, self.args.beta, self.args.beta_floor)
        self._pending_references = []

    @staticmethod
    def _tokenised(data, tokenizer, args: AFTConfig, nll_data, end: list[int], name: str) -> Dataset | None:
        if data is None or isinstance(data, Dataset):
            return data  # None, or already tokenised (AlignDataset, NLLDataset, a user's torch Dataset)
        groups = to_groups(data, source=name)
        if isinstance(nll_data, NLLDataset):
            nll = nll_data
        else:
            pairs = (
                default_nll_pairs(groups)
                if nll_data is None
                else [(r["prompt"], r["completion"]) if isinstance(r, dict) else tuple(r) for r in nll_data]
            )
            nll = NLLDataset.from_texts(tokenizer, pairs, args.max_response_tokens, end)
        if len(nll) == 0 and get_method(args.method).loss is None:
            raise ValueError(
                f"{name}: method '{args.method}' trains on NLL data only, and there is none (no "
                "references, no correct candidates); pass nll_dataset"
            )
        return AlignDataset(
            tokenizer,
            groups,
            nll,
            args.max_candidates,
            args.include_reference,
            args.max_response_tokens,
            seed=args.seed,
            end=end,
        )

    # Trainer would drop the `nll` / `groups` keys of our items (they are not model.forward arguments).
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def _get_num_items_in_batch(self, batch_samples: list, device) -> dict[str, torch.Tensor]:
        """NLL target tokens and questions in this optimiser step: summed over its micro-batches and over
        processes. Dividing each micro-batch's summed loss by these (times the world size, which DDP /
        FSDP / DeepSpeed average over) makes W processes x G micro-batches of B give exactly the gradient
        of one batch of W*G*B: a token mean for the NLL term, a question mean for the alignment term."""
        tokens = sum(int((b["nll"]["labels"][:, 1:] != -100).sum()) for b in batch_samples if "nll" in b)
        questions = sum(len(b["groups"]) for b in batch_samples if "groups" in b)
        counts = torch.tensor([tokens, questions], dtype=torch.long, device=device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return {"nll_tokens": counts[0], "questions": counts[1]}

    def candidate_batch(self, model, groups) -> CandidateBatch:
        """Score every candidate of `groups` under `model` and lay the scores and feedback out as [B, K]."""
        pad = self.processing_class.pad_token_id
        # gradient checkpointing turns the KV cache off in training, so the shared prompt cannot be reused
        checkpointing = getattr(self.args, "activation_checkpointing", None) or getattr(
            self.args, "gradient_checkpointing", False
        )
        share = self.args.share_prefix and not (model.training and checkpointing)
        scored = score_groups(
            model, [g.prompt for g in groups], [g.candidates for g in groups], pad, share_prefix=share
        )
        if model.training:
            self._count(
                "candidate_tokens_scored",
                sum(candidate_tokens(len(g.prompt), [len(c) for c in g.candidates], share) for g in groups),
            )
        b, index = len(groups), scored.group_index
        mean, valid = to_padded(scored.mean, index, b)
        dev = mean.device

        def padded(values: list) -> torch.Tensor:
            return to_padded(torch.tensor(values, device=dev, dtype=torch.float), index, b)[0]

        ref = None
        if self.method.needs_reference_logps or self.args.beta_auto:
            if any(g.ref_logps is None for g in groups):
                raise ValueError(
                    f"method '{self.method.name}' needs reference log-probs (AFTTrainer computes "
                    "them for the datasets it is given)"
                )
            ref = padded([x for g in groups for x in g.ref_logps])
        beta: float | torch.Tensor = self.args.beta
        if self.args.beta_auto:
            beta = torch.tensor([g.beta for g in groups], device=dev, dtype=mean.dtype)
        return CandidateBatch(
            mean=mean,
            sum=to_padded(scored.logp_sum, index, b)[0],
            positive=padded([p for g in groups for p in g.positive]).bool() & valid,
            ranks=padded([r for g in groups for r in g.ranks]).long(),
            valid=valid,
            ref_logps=ref,
            beta=beta,
            dpo_beta=self.args.dpo_beta,
        )

    def alignment_terms(self, model, groups) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-question alignment loss [B] of the method, and the mean scores of positives / negatives."""
        batch = self.candidate_batch(model, groups)
        per_q = self.method.loss(batch)
        with torch.no_grad():
            pos = batch.positive
            neg = batch.valid & ~pos
            stats = {
                "score_pos": batch.mean[pos].mean().item() if pos.any() else float("nan"),
                "score_neg": batch.mean[neg].mean().item() if neg.any() else float("nan"),
            }
        return per_q, stats

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training (counts given): local sums / step counts * world size. Evaluation: plain batch means."""
        counts = num_items_in_batch if isinstance(num_items_in_batch, dict) else None
        world = self.accelerator.num_processes if counts is not None else 1
        loss = torch.zeros((), device=self.args.device)
        prefix = "" if model.training else "eval_"
        if "nll" in inputs:
            nll = model(**inputs["nll"]).loss  # token mean over this micro-batch
            if model.training:
                self._count("nll_tokens_scored", int(inputs["nll"]["attention_mask"].sum()))
            self._metrics[prefix + "nll"].append(nll.item())
            if counts is not None:
                n = (inputs["nll"]["labels"][:, 1:] != -100).sum()
                nll = nll * n / counts["nll_tokens"].clamp(min=1) * world
            loss = loss + nll
        if "groups" in inputs and self.method.loss is not None and self.args.lambda_ > 0:
            per_q, stats = self.alignment_terms(model, inputs["groups"])
            self._metrics[prefix + "align_loss"].append(per_q.mean().item())
            align = per_q.mean() if counts is None else per_q.sum() / counts["questions"].clamp(min=1) * world
            loss = loss + self.args.lambda_ * align
            for k, v in stats.items():
                if v == v:  # skip NaN (no positives/negatives in this batch)
                    self._metrics[prefix + k].append(v)
        finite = bool(torch.isfinite(loss.detach()))
        ok = finite
        if self.accelerator.num_processes > 1:
            # every process learns that one diverged and all raise together (one raising alone would leave the
            # others waiting in their next collective until the timeout)
            flag = torch.tensor(int(finite), device=loss.device)
            ok = int(self.accelerator.reduce(flag, reduction="sum")) == self.accelerator.num_processes
        if not ok:
            what = f"became {loss.item()}" if not finite else "became non-finite on another process"
            raise TrainingDiverged(
                f"loss {what} at step {self.state.global_step}; stopping. The last saved checkpoint in "
                f"{self.args.output_dir} is intact. Try a lower learning rate, bf16 off, or a smaller lambda."
            )
        return (loss, None) if return_outputs else loss

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        # accelerate drops an FSDP config on CPU processes (silently DDP); attach it as on a GPU (aftune.training.fsdp)
        if attach_fsdp_on_cpu(self.accelerator, getattr(self.args, "fsdp_plugin_args", None)):
            self.is_fsdp_enabled = True

    def _count(self, key: str, n: int) -> None:
        counter = find_counter(self)
        if counter is not None:
            counter.add(key, n)

    def _save_checkpoint(self, model, trial):
        # Non-finite weights (an optimiser step on an inf/NaN gradient) must not become the newest
        # checkpoint: resume would pick it over the last good one.
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDiverged(
                f"parameter {bad[0]} became non-finite at step {self.state.global_step}; stopping without saving. "
                f"The last saved checkpoint in {self.args.output_dir} is intact. Try a lower learning rate."
            )
        return super()._save_checkpoint(model, trial)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the means of the recorded metrics since the last log, over every micro-batch of every process
        (Trainer calls log on all processes at the same points)."""
        prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
        keys = [prefix + k for k in METRICS]
        sums = [[sum(self._metrics.get(k, [])), len(self._metrics.get(k, []))] for k in keys]
        for k in keys:
            self._metrics.pop(k, None)
        totals = torch.tensor(sums, dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        for k, (total, n) in zip(keys, totals.tolist()):
            if n > 0:
                logs[k] = total / n
        super().log(logs, *args, **kwargs)
