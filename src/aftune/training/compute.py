"""Compute accounting: what a run spent, so methods can be compared at equal generated tokens or wall time.

Counted quantities (all cumulative over one run, kept exact under kill-and-resume):

* ``generated_tokens``: tokens sampled from the model, i.e. sum_c n_tokens(c) over every sampled completion c
  (EOS / stop-string tokens included, duplicates included: they were generated even if dedupe drops them).
* ``nll_tokens_scored``: non-padding tokens of the NLL sequences forwarded in training (prompt + response):
  sum_i (|x_i| + |y_i|) over the NLL examples of every training micro-batch.
* ``candidate_tokens_scored``: tokens of the candidate sequences forwarded in training: per question
  |x| * m + sum_c |y_c|, with m = 1 when the prompt's KV cache is shared by its candidates (share_prefix) and
  m = the number of candidates otherwise.
* ``optimizer_steps`` and wall seconds (``train_seconds``: the optimiser steps kept, resampling included;
  ``resample_seconds``: the part spent re-sampling candidates inside training).

Evaluation passes (eval loss, greedy accuracy) are not training compute and are reported as wall time only.

Under several processes the token counts are the whole run's, summed over processes: each optimiser step's
per-process counts are all-reduced at the step's end, so every process holds the same totals, checkpoints
(written by the main process) hold them, and a resumed run restores them on every process. Wall seconds are
the main process's.

The training counters live in a `ComputeCounter` callback that is an `ExportableState`: Trainer writes its
counts into every checkpoint's trainer_state.json (``stateful_callbacks``), and on resume the counter reads
them back in ``on_train_begin``, so a resumed run reports the same totals as a straight one (the work lost
between the last checkpoint and a kill is not counted, exactly as its optimiser steps are not).
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from aftune.distributed import rank_and_world

TRAIN_COUNTS = ("nll_tokens_scored", "candidate_tokens_scored", "generated_tokens", "resamples")
TRAIN_SECONDS = ("train_seconds", "resample_seconds")


def zero_counts() -> dict[str, float]:
    return {**{k: 0 for k in TRAIN_COUNTS}, **{k: 0.0 for k in TRAIN_SECONDS}}


class ComputeCounter(TrainerCallback, ExportableState):
    """Cumulative training compute of one Trainer run, saved in and restored from its checkpoints.

    The trainer adds to ``counts`` (``add``); wall time per optimiser step is measured here between
    consecutive ``on_step_end`` calls (the first from ``on_train_begin``).
    """

    def __init__(self) -> None:
        self.counts: dict[str, float] = zero_counts()
        self._pending: dict[str, float] = {}  # this process's counts since the last step end (several processes)
        self._last: float | None = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {"counts": dict(self.counts)}}

    def add(self, key: str, value: float) -> None:
        if rank_and_world()[1] > 1:
            self._pending[key] = self._pending.get(key, 0) + value
        else:
            self.counts[key] = self.counts.get(key, 0) + value

    def flush(self, device=None) -> None:
        """Add every process's pending counts to the totals (a collective: all processes call it together)."""
        if rank_and_world()[1] == 1:
            return
        import torch
        import torch.distributed as dist

        values = torch.tensor([float(self._pending.get(k, 0)) for k in TRAIN_COUNTS], dtype=torch.float64)
        values = values.to(device or "cpu")
        dist.all_reduce(values)
        for k, v in zip(TRAIN_COUNTS, values.tolist()):
            self.counts[k] = self.counts.get(k, 0) + v
        self._pending = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.counts = saved_counts(state) or zero_counts()
        self._pending = {}
        # a checkpoint written before this counter existed has no entry; Trainer's save would KeyError on it
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # before Trainer saves this step's checkpoint (its state() must hold the step's totals)
        self.flush(args.device)
        now = time.perf_counter()
        if self._last is not None:
            self.counts["train_seconds"] += now - self._last
        self._last = now


def saved_counts(state) -> dict[str, float] | None:
    """The ComputeCounter counts a TrainerState holds (loaded from a checkpoint), or None."""
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(ComputeCounter.__name__)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    if not isinstance(saved, dict):
        return None
    counts = saved.get("attributes", {}).get("counts")
    return {**zero_counts(), **counts} if isinstance(counts, dict) else None


def find_counter(trainer) -> ComputeCounter | None:
    """The trainer's ComputeCounter, looked up each time: restoring callback states replaces the object."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, ComputeCounter):
            return cb
    return None


def training_compute(trainer) -> dict[str, Any]:
    """The `compute` block of a training command's metrics.json.

    After a run restored from its final checkpoint (no training step ran in this process) the counter never
    saw on_train_begin, so the counts come from the restored state instead.
    """
    counter = find_counter(trainer)
    counts = counter.counts if counter is not None and counter._last is not None else saved_counts(trainer.state)
    counts = dict(counts or zero_counts())
    out: dict[str, Any] = {k: int(counts[k]) for k in TRAIN_COUNTS}
    out.update({k: round(float(counts[k]), 3) for k in TRAIN_SECONDS})
    out["tokens_scored"] = out["nll_tokens_scored"] + out["candidate_tokens_scored"]
    out["optimizer_steps"] = int(trainer.state.global_step)
    return out


def candidate_tokens(prompt_len: int, candidate_lens: list[int], share_prefix: bool) -> int:
    """Tokens forwarded to score one question's candidates: |x| * (1 if shared else m) + sum_c |y_c|."""
    return prompt_len * (1 if share_prefix else len(candidate_lens)) + sum(candidate_lens)


def sum_compute(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise sum of compute blocks (e.g. the stages of one iterate round, or all rounds)."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out[k] = out.get(k, 0) + v
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
