"""What every study kind (the grid, the arms study) shares under one `out`: the fingerprint every study in the
folder must match, and each seed's VFT model, training sampling pass, assessment candidates and VFT eval, made
once per seed and reused by every study with the same fingerprint."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from aftune.commands.demo import DemoPlan, task_args_for, vft_config
from aftune.commands.eval import run_eval
from aftune.commands.experiment.layout import (
    METRICS,
    assess_candidates,
    fingerprint_file,
    sampled_candidates,
    subsampled_candidates,
    vft_dir,
    vft_eval,
)
from aftune.commands.resumable import Steps, run_and_mark
from aftune.commands.sample import run_sample
from aftune.commands.sft import run_sft
from aftune.config import EvalConfig, SampleConfig
from aftune.io import InputError, atomic_write_json
from aftune.sampling.store import subsample_candidates


def fingerprint(plan: DemoPlan, data_seed: int, bf16: bool, max_k: int, diag_every: int) -> dict:
    """What every shared output depends on: changing it under an existing folder would mix results."""
    return {
        "plan": dataclasses.asdict(plan),
        "data_seed": data_seed,
        "bf16": bf16,
        "max_k": max_k,
        "diag_every": diag_every,
    }


def check_fingerprint(root: Path, fp: dict, config_path: str | Path) -> None:
    """Refuse a study whose fingerprint differs from the one `root` was started with; record it if new."""
    fp_path = fingerprint_file(root)
    fp = json.loads(json.dumps(fp))  # as it reads back from disk (tuples -> lists)
    if not fp_path.exists():
        atomic_write_json(fp_path, {"fingerprint": fp})
        return
    old = json.loads(fp_path.read_text()).get("fingerprint")
    if old != fp:
        diff = [k for k in fp if (old or {}).get(k) != fp[k]]
        raise InputError(
            f"{root} holds an experiment run with different {', '.join(diff)}; "
            "use a new `out` (methods, seeds, smaller k, beta and lambda may be added freely)",
            config_path,
            field=diff[0] if diff else None,
        )


def check_seeds(seeds: tuple[int, ...] | None, config_seeds: tuple[int, ...], config_path: str | Path) -> None:
    if seeds is not None and not set(seeds) <= set(config_seeds):
        raise InputError(
            f"--seeds {list(seeds)} is not a subset of the config's seeds {list(config_seeds)}",
            config_path,
            field="seeds",
        )


def keep_config(config_path: str | Path, report: Path) -> None:
    """The config as given, next to its results."""
    if Path(config_path).resolve() != (report / "experiment.yaml").resolve():
        shutil.copyfile(config_path, report / "experiment.yaml")


@dataclass(frozen=True)
class SeedFiles:
    """A seed's shared outputs, and the settings every run of the seed is made with."""

    common: dict  # task, task_args, seed, quiet, bf16: the fields every command of the seed shares
    vft_model: str
    candidates: dict[int, Path]  # k -> training candidates (max k sampled, smaller k derived from it)
    assess: Path  # held-out (validation) candidates for the assessment metrics
    eval_args: dict  # EvalConfig fields of every test-split eval of the seed (all but model and out)


def seed_steps(
    step: Steps,
    root: Path,
    seed: int,
    plan: DemoPlan,
    data_seed: int,
    bf16: bool,
    quiet: bool,
    kmax: int,
    ks: tuple[int, ...] = (),
) -> SeedFiles:
    """Run (or skip, when done) the shared steps of one seed: VFT, the k=kmax sampling pass, the assessment
    candidates, the files of every smaller k in `ks`, and the VFT start's test eval."""
    common = dict(task="arith", task_args=task_args_for(plan, data_seed), seed=seed, quiet=quiet, bf16=bf16)
    vft = vft_dir(root, seed)
    step(f"seed{seed}/sft (VFT start)", vft / METRICS, run_sft, vft_config(plan, common, vft))
    vft_model = str(vft / "model")
    sample = dict(
        **common, model=vft_model, temperature=plan.temperature, max_new_tokens=plan.max_new_tokens, batch_size=32
    )
    cands = {kmax: sampled_candidates(root, seed, kmax)}
    assess = assess_candidates(root, seed)
    step(
        f"seed{seed}/sample (train, k={kmax})",
        cands[kmax].with_suffix(".done"),
        run_and_mark,
        run_sample,
        SampleConfig(**sample, k=kmax, out=str(cands[kmax]), split="train", n_questions=plan.n_sample),
    )
    step(
        f"seed{seed}/sample (assess)",
        assess.with_suffix(".done"),
        run_and_mark,
        run_sample,
        SampleConfig(**sample, k=plan.k, out=str(assess), split="validation", n_questions=plan.n_assess),
    )
    for k in ks:
        if k != kmax:
            cands[k] = subsampled_candidates(root, seed, k, kmax)
            step(f"seed{seed}/candidates k={k}", cands[k], subsample_candidates, cands[kmax], cands[k], k)
    ev = dict(**common, split="test", batch_size=64, max_new_tokens=plan.max_new_tokens, candidates=str(assess))
    step(
        f"seed{seed}/eval VFT (start)",
        vft_eval(root, seed),
        run_eval,
        EvalConfig(**ev, model=vft_model, out=str(vft_eval(root, seed))),
    )
    return SeedFiles(common=common, vft_model=vft_model, candidates=cands, assess=assess, eval_args=ev)


def run_and_clean(run, cfg) -> None:
    """Run a training command, then delete its checkpoints (weights + optimiser state, only there for resuming):
    a finished run keeps its model. Nested ones too (`aftune iterate` keeps one folder per round)."""
    run(cfg)
    for ckpt in sorted(Path(cfg.out).rglob("checkpoints")):
        if ckpt.is_dir():
            shutil.rmtree(ckpt, ignore_errors=True)
