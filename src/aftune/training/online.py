"""Semi-online AFT: re-sample the training candidates from the current model every S optimiser steps.

Offline AFT trains all its steps on candidates sampled once from the start model pi_0. Semi-online AFT
re-samples: after optimiser step t with t mod S == 0 (and t < max_steps), every training question q gets
fresh candidates c_1..c_k ~ pi_theta_t(. | q), labelled by the task's grader, and steps t+1..t+S train on
them. S >= max_steps is offline AFT, S = 1 is on-policy (each step's candidates come from the weights that
step starts from). Sampling goes through the same sampler (`generate_k`, or vLLM with the current weights loaded
into it: `--resample-backend vllm`, CUDA only) and labelling (`build_group`) as `aftune sample`, each question
drawn from its own seed, so a group's candidates are built exactly as in a candidates file.

Exact under resume. Resampling at step t is seeded by (seed, t), and each resampled set is written to
OUT/resample/step{t}.jsonl (atomically) before step t+1 runs. A resumed run that reaches step t again reads
that file instead of sampling: the killed run produced it from the weights of a straight run at step t. A
run resumed from checkpoint c re-installs the newest file with step <= c before training on.

The resampled candidates replace the training items' contents in place (`GroupItem` fields): batches hold
references to the items, so a batch the data loader fetched ahead still trains on the new candidates.

Not supported (a clear InputError from `check_semi_online`): methods with DPO-style reference log-probs or
a per-question beta from the start model (both would have to be recomputed with the frozen start model for
every resampled set), methods without a candidate loss (vft, rft) or whose NLL data are the sampled
candidates (rft-*), and several processes.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from aftune.io import InputError, write_jsonl
from aftune.records import Example, Group, read_groups
from aftune.sampling.sampler import SamplingConfig, generate_k, question_seed
from aftune.sampling.store import build_group, group_stats
from aftune.training.compute import find_counter
from aftune.training.data import AlignDataset
from aftune.training.replica import SamplingReplica


def check_semi_online(method, beta_auto: str, world_size: int, every: int, field: str = "--resample-every") -> None:
    """InputError when semi-online resampling cannot be exact for this method / setup."""
    if every < 0:
        raise InputError(f"must be >= 0 (0 = off), got {every}", field=field)
    if every == 0:
        return
    if method.needs_reference_logps or beta_auto:
        raise InputError(
            f"method '{method.name}' (or --beta-auto) needs the start model's log-probs of the "
            "candidates, which semi-online resampling would have to recompute every round; use it "
            "offline (or in `aftune iterate` rounds)",
            field=field,
        )
    if method.loss is None:
        raise InputError(
            f"method '{method.name}' has no candidate loss, so resampling changes nothing it trains on", field=field
        )
    if method.nll_data == "rft":
        raise InputError(
            f"method '{method.name}' trains its NLL term on the sampled candidates; semi-online "
            "resampling supports methods whose candidates enter only the alignment loss",
            field=field,
        )
    if world_size > 1:
        raise InputError("semi-online resampling runs in one process (the sampler is not sharded)", field=field)


def resample_steps(every: int, max_steps: int) -> list[int]:
    """The optimiser steps after which candidates are re-sampled: S, 2S, ... < max_steps."""
    return list(range(every, max_steps, every)) if every > 0 else []


class ResampleCallback(TrainerCallback):
    """Re-sample the AlignDataset's candidates from the current model every `every` optimiser steps.

    Args:
        tokenizer: the model's tokenizer.
        dataset: the trainer's AlignDataset (its items are updated in place).
        examples: {(task name, question id): (task, Example)} for grading every group of `dataset`.
        every: S (optimiser steps between resamplings).
        sampling: the sampling settings (k, temperature, max_new_tokens, stop, batch_size); the seed is
            replaced per resampling by crc32(f"{seed}:resample:{t}").
        out_dir: where step{t}.jsonl files go.
        max_candidates, include_reference, max_response_tokens, end: as for the AlignDataset.
        seed: the run's seed.
        engine: a vllm_backend.VLLMEngine to sample with (the model's weights are loaded into it first each
            time), or None: the built-in sampler on the live model.
    """

    def __init__(
        self,
        tokenizer,
        dataset: AlignDataset,
        examples: dict[tuple[str, str], tuple[Any, Example]],
        every: int,
        sampling: SamplingConfig,
        out_dir: str | os.PathLike,
        max_candidates: int,
        include_reference: bool,
        max_response_tokens: int | None,
        seed: int,
        end: list[int] | None = None,
        engine=None,
    ):
        missing = [g.id for g in dataset.groups if (g.task, g.id) not in examples]
        if missing:
            raise InputError(
                f"question {missing[0]!r} is not in the task's train split, so it cannot be regraded when resampling",
                field="--resample-every",
            )
        self.tok, self.ds, self.examples, self.every = tokenizer, dataset, examples, every
        self.sampling, self.dir = sampling, Path(out_dir)
        self.max_candidates, self.include_reference = max_candidates, include_reference
        self.max_response_tokens, self.seed, self.end = max_response_tokens, seed, end
        self.trainer = None  # set after the trainer is built: the compute counter lives there
        self.replica = SamplingReplica()  # whole weights when FSDP2 / ZeRO-3 shard the policy
        self.engine = engine

    def path(self, step: int) -> Path:
        return self.dir / f"step{step}.jsonl"

    def on_train_begin(self, args, state, control, **kwargs):
        done = [t for t in resample_steps(self.every, args.max_steps) if t <= state.global_step]
        if done:  # resumed past a resampling: train on the candidates that run was training on
            path = self.path(done[-1])
            if not path.exists():
                raise InputError(
                    f"resuming at step {state.global_step}, but the candidates resampled at step "
                    f"{done[-1]} are missing",
                    path,
                )
            self._install(read_groups(path), done[-1])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        t = state.global_step
        if self.every <= 0 or t % self.every or t >= args.max_steps:
            return
        t0 = time.perf_counter()
        path = self.path(t)
        if path.exists():  # written by a killed run at this very step (same weights): reuse, not resample
            groups = read_groups(path)
        else:
            groups = self.sample(model, t)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            write_jsonl(tmp, [g.to_dict() for g in groups])
            os.replace(tmp, path)
        self._install(groups, t)
        counter = find_counter(self.trainer) if self.trainer is not None else None
        if counter is not None:
            counter.add("generated_tokens", sum(int(g.meta.get("generated_tokens", 0)) for g in groups))
            counter.add("resamples", 1)
            counter.add("resample_seconds", time.perf_counter() - t0)

    def sample(self, model, step: int) -> list[Group]:
        """k fresh, labelled candidates per training question from `model` (seeded by the step)."""
        groups = self.ds.groups
        model = self.replica(model)  # whole weights when FSDP2 / ZeRO-3 shard the policy (every rank gathers)
        cfg = replace(self.sampling, seed=zlib.crc32(f"{self.seed}:resample:{step}".encode()))
        prompts = [g.prompt for g in groups]
        seeds = [question_seed(cfg.seed, f"{g.task}/{g.id}") for g in groups]  # either engine draws the same
        if self.engine is not None:
            self.engine.load_weights(model)
            samples = self.engine.generate(prompts, cfg, seeds)
        else:
            samples = generate_k(model, self.tok, prompts, cfg, seeds=seeds)
        out = []
        for g, s in zip(groups, samples):
            task, ex = self.examples[(g.task, g.id)]
            new = build_group(task, ex, g.prompt, s, cfg.k)
            new.meta["generated_tokens"] = sum(x.n_tokens for x in s)
            new.meta["resampled_at_step"] = step
            out.append(new)
        return out

    def _install(self, groups: list[Group], step: int) -> None:
        if [(g.task, g.id) for g in groups] != [(g.task, g.id) for g in self.ds.groups]:
            raise InputError(
                f"resampled candidates of step {step} are for other questions than this run's", self.path(step)
            )
        fresh = AlignDataset(
            self.tok,
            groups,
            self.ds.nll,
            max_candidates=self.max_candidates,
            include_reference=self.include_reference,
            max_response_tokens=self.max_response_tokens,
            seed=zlib.crc32(f"{self.seed}:select:{step}".encode()),
            end=self.end,
        )
        for item, new in zip(self.ds.items, fresh.items):
            item.prompt, item.candidates, item.positive = new.prompt, new.candidates, new.positive
            item.ranks, item.is_reference, item.ref_logps, item.beta = new.ranks, new.is_reference, None, None
        self.ds.groups[:] = groups


def resample_history(out_dir: str | os.PathLike, every: int, max_steps: int) -> list[dict[str, Any]]:
    """Per resampling (from the files on disk): its step, generated tokens and the candidates' label stats."""
    rows = []
    for t in resample_steps(every, max_steps):
        path = Path(out_dir) / f"step{t}.jsonl"
        if not path.exists():
            continue
        groups = read_groups(path)
        rows.append(
            {
                "step": t,
                "generated_tokens": sum(int(g.meta.get("generated_tokens", 0)) for g in groups),
                **group_stats(groups),
            }
        )
    return rows
