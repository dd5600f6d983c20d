"""Training-time assessment diagnostics: every N steps, score a held-out slice of candidates and log
assessment accuracy, mean scores of positives / negatives / references, and raise the
likelihood-displacement alarm when positives or references lose likelihood (DPO's known failure)."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from aftune.evaluation.assessment import assessment_metrics, displacement_alarm
from aftune.records import Group
from aftune.scoring import score_texts

log = logging.getLogger("aftune")
WATCHED = ("mean_score_positive", "mean_score_reference")


class DiagnosticsCallback(TrainerCallback):
    def __init__(
        self,
        tokenizer,
        groups: list[Group],
        every: int,
        threshold: float = 0.05,
        max_response_tokens: int | None = None,
        end: list[int] | None = None,
    ):
        self.tokenizer, self.groups, self.every, self.threshold = tokenizer, groups, every, threshold
        self.max_response_tokens, self.end = max_response_tokens, end
        self.history: list[dict] = []
        self.alarms: list[dict] = []
        self.trainer = None  # set by the runner so diagnostics go through Trainer.log -> report_to

    def measure(self, model, step: int) -> dict:
        scores, refs = score_texts(
            model, self.tokenizer, self.groups, max_response_tokens=self.max_response_tokens, end=self.end
        )
        m = assessment_metrics(self.groups, scores, refs)
        row = {
            "step": step,
            **{
                k: m[k]
                for k in (
                    "assessment_acc_macro",
                    "assessment_acc_micro",
                    "mean_score_positive",
                    "mean_score_negative",
                    "mean_score_reference",
                )
            },
        }
        self.history.append(row)
        for key in WATCHED:
            alarm = displacement_alarm(self.history, key, self.threshold)
            if alarm and not any(a["key"] == key for a in self.alarms):  # warn once per watched score
                self.alarms.append(alarm)
                log.warning(alarm["message"])
        return row

    def on_train_begin(self, args, state, control, model=None, **kw):
        if not self.history:
            self.measure(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0:
            row = self.measure(model, state.global_step)
            if self.trainer is not None:
                self.trainer.log({f"diag/{k}": v for k, v in row.items() if k != "step" and v is not None})
