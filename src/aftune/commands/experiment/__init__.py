"""`aftune experiment CONFIG.yaml`: a grid of resumable runs (protocol x method x seed x k x beta x lambda)
on `arith`.

Per seed, one VFT model, one sampling pass at max(k) (smaller k: the first k distinct candidates of each
group, written to a derived file), one held-out assessment candidate set and one VFT eval are shared by
every run of that seed. Every method is compared with the control (`vft`: same steps, same NLL batches,
no alignment term) of its own seed and protocol (demo.PROTOCOLS: continue from VFT, or train from the base):
mean +- std over seeds and a paired McNemar test on per-question
predictions. Each step is skipped when its output exists, so a killed experiment resumes.
See docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path

from aftune.commands.align import run_align
from aftune.commands.demo import align_config, runs_dir, task_args_for, vft_config
from aftune.commands.eval import run_eval
from aftune.commands.experiment.config import CONTROL, Experiment, load_experiment
from aftune.commands.experiment.grid import grid
from aftune.commands.experiment.results import write_results
from aftune.commands.resumable import Steps, run_and_mark
from aftune.commands.sample import run_sample
from aftune.commands.sft import run_sft
from aftune.config import EvalConfig, SampleConfig
from aftune.io import InputError, atomic_write_json
from aftune.sampling.store import subsample_candidates

__all__ = ["CONTROL", "Experiment", "load_experiment", "grid", "run_experiment", "write_results"]


def _fingerprint(exp: Experiment) -> dict:
    # what every shared output depends on: changing it under an existing folder would mix results
    return {
        "plan": dataclasses.asdict(exp.plan),
        "data_seed": exp.data_seed,
        "bf16": exp.bf16,
        "max_k": exp.kmax,
        "diag_every": exp.diag_every,
    }


def run_experiment(
    config_path: str, out: str | None = None, quiet: bool = False, seeds: tuple[int, ...] | None = None
) -> dict:
    """Run (or resume) the grid of `config_path`, then write results.{md,json} and plots; returns a summary.

    `seeds`: run only these of the config's seeds (to spread one experiment over several processes); the
    results are then not written: a run over all seeds (which skips the finished work) writes them."""
    exp = load_experiment(config_path)
    if out is not None:
        exp = replace(exp, out=out)
    if seeds is not None and not set(seeds) <= set(exp.seeds):
        raise InputError(
            f"--seeds {list(seeds)} is not a subset of the config's seeds {list(exp.seeds)}",
            config_path,
            field="seeds",
        )
    root = Path(exp.out)
    report = Path(exp.report or exp.out)
    root.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    fp_path = root / "experiment.json"
    fp = _fingerprint(exp)
    if fp_path.exists():
        old = json.loads(fp_path.read_text()).get("fingerprint")
        if old != json.loads(json.dumps(fp)):
            diff = [k for k in fp if (old or {}).get(k) != json.loads(json.dumps(fp))[k]]
            raise InputError(
                f"{root} holds an experiment run with different {', '.join(diff)}; "
                "use a new `out` (methods, seeds, smaller k, beta and lambda may be added freely)",
                config_path,
                field=diff[0] if diff else None,
            )
    else:
        atomic_write_json(fp_path, {"fingerprint": fp})  # what every experiment sharing this folder must match
    runs = grid(exp)
    atomic_write_json(
        report / "grid.json",
        {
            "config": str(config_path),
            "name": exp.name,
            "out": str(root),
            "grid": [dataclasses.asdict(r) for r in runs],
        },
    )
    if Path(config_path).resolve() != (report / "experiment.yaml").resolve():
        shutil.copyfile(config_path, report / "experiment.yaml")  # the config as given, next to its results

    plan = exp.plan
    step = Steps(root, "experiment", announce_skips=not quiet)
    timings, skipped = step.timings, step.skipped

    kmax = exp.kmax
    for seed in seeds if seeds is not None else exp.seeds:
        sd = root / f"seed{seed}"
        common = dict(
            task="arith", task_args=task_args_for(plan, exp.data_seed), seed=seed, quiet=quiet, bf16=exp.bf16
        )
        vft = sd / "vft"
        step(f"seed{seed}/sft (VFT start)", vft / "metrics.json", run_sft, vft_config(plan, common, vft))
        vft_model = str(vft / "model")
        sample = dict(
            **common, model=vft_model, temperature=plan.temperature, max_new_tokens=plan.max_new_tokens, batch_size=32
        )
        cands = {kmax: sd / f"candidates.k{kmax}.jsonl"}
        assess = sd / "assess_candidates.jsonl"
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
        for k in exp.ks:
            if k != kmax:
                cands[k] = sd / f"candidates.k{k}-of{kmax}.jsonl"
                step(f"seed{seed}/candidates k={k}", cands[k], subsample_candidates, cands[kmax], cands[k], k)
        ev = dict(**common, split="test", batch_size=64, max_new_tokens=plan.max_new_tokens, candidates=str(assess))
        step(
            f"seed{seed}/eval VFT (start)",
            sd / "eval" / "VFT.json",
            run_eval,
            EvalConfig(**ev, model=vft_model, out=str(sd / "eval" / "VFT.json")),
        )

        for protocol, r in ((p, r) for p in exp.protocols for r in runs if r.seed == seed):
            d = sd / runs_dir(protocol) / r.cell
            k = r.k or kmax
            tag = "" if protocol == "continue" else f" [{protocol}]"
            # the protocol's schedule (the same for every method), with this run's k / beta / lambda
            cfg = replace(
                align_config(plan, common, vft_model, cands[k], assess, d, r.method, protocol),
                beta=r.beta if r.beta is not None else plan.beta,
                lambda_=r.lam if r.lam is not None else 1.0,
                beta_auto="gap" if r.auto else "",
                beta_floor=r.floor if r.auto else 0.02,
                max_candidates=k + 1,
                diag_every=exp.diag_every,
            )
            step(f"seed{seed}/align {r.cell}{tag}", d / "metrics.json", _align_and_clean, run_align, cfg)
            step(
                f"seed{seed}/eval {r.cell}{tag}",
                d / "eval.json",
                run_eval,
                EvalConfig(**ev, model=str(d / "model"), out=str(d / "eval.json")),
            )

    if seeds is not None and set(seeds) != set(exp.seeds):
        print(f"[experiment] seeds {list(seeds)} done; run without --seeds to write the results")
        return {"results": None, "n_runs": len(runs), "skipped": skipped, "timings": timings, "cells": None}
    results = write_results(root, report, exp, runs)
    print(f"[experiment] results: {report / 'results.md'}")
    return {
        "results": str(report / "results.md"),
        "n_runs": len(runs),
        "skipped": skipped,
        "timings": timings,
        "cells": results["cells"],
    }


def _align_and_clean(run_align, cfg) -> None:
    # a finished run keeps only its model: its checkpoints (weights + optimiser state) are for resuming
    run_align(cfg)
    shutil.rmtree(Path(cfg.out) / "checkpoints", ignore_errors=True)
