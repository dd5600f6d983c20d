"""What the frozen start model says about the candidates, computed once, by the engine that trains:

* DPO's reference log-probs (summed log-likelihood of every selected candidate), and
* the per-question boundary margin of `beta_auto: gap`, from the start model's per-token scores.

AFTTrainer computes them when training starts, after accelerate has prepared the model: the forward is the
policy's own (the DeepSpeed / DDP / FSDP wrapper, its dtype and autocast), so the reference equals the policy's
score at step 0, and under ZeRO-3 / FSDP no process holds a second, whole copy of the model. They are cached on
disk (a file named by a hash of the start weights, the candidates and the precision), so a resumed run reads the
start model's values instead of recomputing them from trained weights, and runs that share candidates and a
start model compute them once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from aftune import distributed
from aftune.io import InputError
from aftune.scoring import score_groups
from aftune.training.data import AlignDataset


def dataset_digest(ds: AlignDataset) -> str:
    """sha256 of what the reference scores: every item's prompt and candidate token ids."""
    h = hashlib.sha256()
    for it in ds.items:
        h.update(json.dumps([list(it.prompt), [list(c) for c in it.candidates]]).encode())
    return h.hexdigest()


def cache_path(where: str | Path, weights: str, ds: AlignDataset, precision: str) -> Path:
    """`where` itself when it names a .json file, else `where/reflogps-<key>.json` with the key a hash of the
    start weights' digest, the dataset's token ids and the precision the policy computes in."""
    where = Path(where)
    if where.suffix == ".json":
        return where
    key = hashlib.sha256(json.dumps([weights, dataset_digest(ds), precision]).encode()).hexdigest()
    return where / f"reflogps-{key[:16]}.json"


def reference_logps(
    model,
    tokenizer,
    ds: AlignDataset,
    cache: str | Path | None = None,
    batch_size: int = 16,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    may_compute: bool = True,
) -> None:
    """Set `item.ref_logps` of every item: summed log-probs of its candidates under `model` as it is now.

    `model` is called as given (pass the prepared training engine), inside `context()` (e.g. a PEFT model's
    `disable_adapter`). Every process must call this: under ZeRO-3 / FSDP a forward is a collective, so every
    process runs the same number of batches. With `cache`, the values are computed once (each process scores
    its share of the questions) and stored there; a cache that does not match the items is an InputError.
    `may_compute=False` (a resumed run whose weights are no longer the start model's) reads the cache only."""
    n = len(ds.items)
    _, world = distributed.rank_and_world()

    def compute(indices: list[int]) -> list[list[float]]:
        if not may_compute:
            raise InputError(
                "the start model's reference log-probs are not cached here, and a resumed run cannot recompute "
                "them from trained weights (start over with --no-resume, or restore the file)",
                cache,
            )
        # the same number of forwards on every process: the longest share's batch count
        share = math.ceil(n / world) if cache is not None else n
        rounds = math.ceil(share / batch_size)
        values: list[list[float]] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), context():
                for r in range(rounds):
                    chunk = indices[r * batch_size : (r + 1) * batch_size]
                    items = [ds.items[j] for j in chunk] or [ds.items[0]]  # a filler forward, discarded
                    s = score_groups(
                        model, [it.prompt for it in items], [it.candidates for it in items], tokenizer.pad_token_id
                    )
                    flat = s.logp_sum.float().tolist()
                    for it in items[: len(chunk)]:
                        values.append(flat[: len(it.candidates)])
                        flat = flat[len(it.candidates) :]
        finally:
            model.train(was_training)
        return values

    if cache is None:
        values = compute(list(range(n)))
    else:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        values = distributed.compute_once_sharded(cache, n, compute)
    if len(values) != n or any(len(v) != len(it.candidates) for v, it in zip(values, ds.items)):
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
