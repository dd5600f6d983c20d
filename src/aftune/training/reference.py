"""What the frozen start model says about the candidates, computed once before training:

* DPO's reference log-probs (summed log-likelihood of every selected candidate), and
* the per-question boundary margin of `beta_auto: gap`, from the start model's per-token scores.

Both are cached on disk when a path is given, so training holds one model in memory, and under several
processes each scores its share of the questions.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from aftune import distributed
from aftune.io import InputError
from aftune.scoring import score_groups
from aftune.training.data import AlignDataset


def reference_logps(
    model,
    tokenizer,
    ds: AlignDataset,
    cache: str | Path | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> None:
    """Set `item.ref_logps` of every item: summed log-probs of its candidates under `model` as it is now.

    With `cache`, the values are computed once (sharded over processes, on `device`) and stored there; a
    cache that does not match the items is an InputError."""

    def compute(indices: list[int]) -> list[list[float]]:
        values = []
        home = next(model.parameters()).device
        was_training = model.training
        model.to(device or home).eval()
        with torch.no_grad():
            for i in range(0, len(indices), batch_size):
                items = [ds.items[j] for j in indices[i : i + batch_size]]
                s = score_groups(
                    model, [it.prompt for it in items], [it.candidates for it in items], tokenizer.pad_token_id
                )
                flat = s.logp_sum.tolist()
                for it in items:
                    values.append(flat[: len(it.candidates)])
                    flat = flat[len(it.candidates) :]
        model.to(home).train(was_training)
        return values

    if cache is None:
        values = compute(list(range(len(ds.items))))
    else:
        values = distributed.compute_once_sharded(cache, len(ds.items), compute)
    if len(values) != len(ds.items) or any(len(v) != len(it.candidates) for v, it in zip(values, ds.items)):
        raise InputError("cached reference log-probs do not match the candidates (delete the file)", cache)
    for it, v in zip(ds.items, values):
        it.ref_logps = v


def gap_beta(pos: list[float], neg: list[float], factor: float, floor: float) -> float:
    """beta_q = max(floor, factor * median_n(min_p s_p - s_n)) over one question's start-model scores (nats
    per token): the boundary B = min_p s_p - beta_q then starts `factor` times as far below the weakest
    positive as the median negative sits under the start model (docs/method.md, Eq. 9). Without both
    kinds: floor (the loss is 0 there anyway)."""
    if not pos or not neg:
        return floor
    weakest = min(pos)
    return max(floor, factor * statistics.median(weakest - s for s in neg))


def question_betas(ds: AlignDataset, factor: float, floor: float) -> None:
    """Set `item.beta` of every item from its reference log-probs (see gap_beta); the reference solution
    counts as a positive. Needs `reference_logps` first."""
    for it in ds.items:
        if it.ref_logps is None:
            raise ValueError("question_betas needs reference log-probs (call reference_logps first)")
        per_token = [lp / len(c) for lp, c in zip(it.ref_logps, it.candidates) if c]
        flags = [p for p, c in zip(it.positive, it.candidates) if c]
        it.beta = gap_beta(
            [s for s, p in zip(per_token, flags) if p], [s for s, p in zip(per_token, flags) if not p], factor, floor
        )
