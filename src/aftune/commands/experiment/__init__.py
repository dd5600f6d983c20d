"""`aftune experiment CONFIG.yaml`: a grid of resumable runs (protocol x method x seed x k x beta x lambda)
on `arith`, or (a config with `arms:`) an arms study of align / iterate / grpo commands (`experiment.arms`).

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
from dataclasses import replace
from pathlib import Path

from aftune.commands.align import run_align
from aftune.commands.demo import align_config, runs_dir
from aftune.commands.eval import run_eval
from aftune.commands.experiment.config import CONTROL, Experiment, load_experiment
from aftune.commands.experiment.grid import grid
from aftune.commands.experiment.results import write_results
from aftune.commands.experiment.shared import (
    check_fingerprint,
    check_seeds,
    fingerprint,
    keep_config,
    run_and_clean,
    seed_steps,
)
from aftune.commands.resumable import Steps
from aftune.config import EvalConfig, read_yaml_mapping
from aftune.io import atomic_write_json

__all__ = ["CONTROL", "Experiment", "load_experiment", "grid", "run_experiment", "write_results"]


def run_experiment(
    config_path: str, out: str | None = None, quiet: bool = False, seeds: tuple[int, ...] | None = None
) -> dict:
    """Run (or resume) the study of `config_path`, then write its results and plots; returns a summary.

    A config with `arms:` is an arms study (`experiment.arms`: one align / iterate / grpo command per arm);
    otherwise it is a grid of method x seed x k x beta x lambda.
    `seeds`: run only these of the config's seeds (to spread one experiment over several processes); the
    results are then not written: a run over all seeds (which skips the finished work) writes them."""
    if "arms" in read_yaml_mapping(config_path):
        from aftune.commands.experiment.arms import run_arms  # the arms study imports iterate and grpo

        return run_arms(config_path, out=out, quiet=quiet, seeds=seeds)
    exp = load_experiment(config_path)
    if out is not None:
        exp = replace(exp, out=out)
    check_seeds(seeds, exp.seeds, config_path)
    root = Path(exp.out)
    report = Path(exp.report or exp.out)
    root.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    check_fingerprint(root, fingerprint(exp.plan, exp.data_seed, exp.bf16, exp.kmax, exp.diag_every), config_path)
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
    keep_config(config_path, report)

    plan = exp.plan
    step = Steps(root, "experiment", announce_skips=not quiet)
    timings, skipped = step.timings, step.skipped

    kmax = exp.kmax
    for seed in seeds if seeds is not None else exp.seeds:
        sd = root / f"seed{seed}"
        files = seed_steps(step, root, seed, plan, exp.data_seed, exp.bf16, quiet, kmax, exp.ks)
        cands, ev = files.candidates, files.eval_args

        for protocol, r in ((p, r) for p in exp.protocols for r in runs if r.seed == seed):
            d = sd / runs_dir(protocol) / r.cell
            k = r.k or kmax
            tag = "" if protocol == "continue" else f" [{protocol}]"
            # the protocol's schedule (the same for every method), with this run's k / beta / lambda
            cfg = replace(
                align_config(plan, files.common, files.vft_model, cands[k], files.assess, d, r.method, protocol),
                beta=r.beta if r.beta is not None else plan.beta,
                lambda_=r.lam if r.lam is not None else 1.0,
                beta_auto="gap" if r.auto else "",
                beta_floor=r.floor if r.auto else 0.02,
                max_candidates=k + 1,
                diag_every=exp.diag_every,
            )
            step(f"seed{seed}/align {r.cell}{tag}", d / "metrics.json", run_and_clean, run_align, cfg)
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
