"""AFTTrainer: a thin `transformers.Trainer` subclass. The loss lives in aftune.losses; the trainer only
tokenised-batch -> scores -> loss wiring. accelerate / DeepSpeed / FSDP, PEFT, logging and resume come
from Trainer itself."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from aftune.io import RunError
from aftune.scoring import score_groups, to_padded
from aftune.training.methods import GroupBatch, get_method


class TrainingDiverged(RunError):
    """Raised when the loss or the scores stop being finite; the last saved checkpoint is kept."""


@dataclass
class AFTTrainingArguments(TrainingArguments):
    method: str = field(default="bc", metadata={"help": "training method (see aftune.training.methods)"})
    beta: float = field(default=0.5, metadata={"help": "boundary margin in nats per token"})
    lambda_: float = field(default=1.0, metadata={"help": "weight of the alignment loss"})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO inverse temperature"})
    share_prefix: bool = field(default=True, metadata={"help": "score k candidates with the prompt computed once"})


@dataclass
class _Scores:
    mean_padded: torch.Tensor
    sum_padded: torch.Tensor


class AFTTrainer(Trainer):
    # compute_loss normalises by the whole optimiser step's counts (see _get_num_items_in_batch)
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = get_method(self.args.method)
        self.model_accepts_loss_kwargs = False  # the model is never given num_items_in_batch
        self._metrics: dict[str, list[float]] = defaultdict(list)

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

    def alignment_terms(self, model, groups) -> tuple[torch.Tensor, dict[str, float]]:
        pad = self.processing_class.pad_token_id if self.processing_class is not None else 0
        # gradient checkpointing turns the KV cache off in training, so the shared prompt cannot be reused
        checkpointing = getattr(self.args, "activation_checkpointing", None) or getattr(self.args, "gradient_checkpointing", False)
        share = self.args.share_prefix and not (model.training and checkpointing)
        scored = score_groups(model, [g.prompt for g in groups], [g.candidates for g in groups], pad, share_prefix=share)
        b = len(groups)
        mean_p, valid = to_padded(scored.mean, scored.group_index, b)
        sum_p, _ = to_padded(scored.logp_sum, scored.group_index, b)
        dev = mean_p.device
        flat_pos = torch.tensor([p for g in groups for p in g.positive], device=dev)
        flat_rank = torch.tensor([r for g in groups for r in g.ranks], device=dev)
        positive, _ = to_padded(flat_pos.float(), scored.group_index, b)
        ranks, _ = to_padded(flat_rank.float(), scored.group_index, b)
        ref = None
        if self.method.needs_reference_logps:
            if any(g.ref_logps is None for g in groups):
                raise ValueError(f"method '{self.method.name}' needs reference log-probs (computed by `aftune align`)")
            ref, _ = to_padded(torch.tensor([x for g in groups for x in g.ref_logps], device=dev), scored.group_index, b)
        batch = GroupBatch(positive=positive.bool() & valid, ranks=ranks.long(), valid=valid, ref_logps=ref)
        per_q = self.method.loss(_Scores(mean_p, sum_p), batch, self.args)
        with torch.no_grad():
            pos = batch.positive
            neg = valid & ~pos
            stats = {
                "score_pos": mean_p[pos].mean().item() if pos.any() else float("nan"),
                "score_neg": mean_p[neg].mean().item() if neg.any() else float("nan"),
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
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.state.global_step}; stopping. The last saved checkpoint "
                f"in {self.args.output_dir} is intact. Try a lower learning rate, bf16 off, or a smaller lambda.")
        return (loss, None) if return_outputs else loss

    def _save_checkpoint(self, model, trial):
        # Non-finite weights (an optimiser step on an inf/NaN gradient) must not become the newest
        # checkpoint: resume would pick it over the last good one.
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDiverged(
                f"parameter {bad[0]} became non-finite at step {self.state.global_step}; stopping without saving. "
                f"The last saved checkpoint in {self.args.output_dir} is intact. Try a lower learning rate.")
        return super()._save_checkpoint(model, trial)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        is_eval = any(k.startswith("eval_") for k in logs)
        for k in list(self._metrics):
            if k.startswith("eval_") == is_eval:
                vals = self._metrics.pop(k)
                logs[k] = sum(vals) / len(vals)
        super().log(logs, *args, **kwargs)
