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
from aftune.commands.demo import align_config
from aftune.commands.eval import run_eval
from aftune.commands.experiment.config import CONTROL, Experiment, load_experiment
from aftune.commands.experiment.grid import Run, grid
from aftune.commands.experiment.layout import EVAL, METRICS, cell_dir, lr_tag, runs_dir, trial_dir
from aftune.commands.experiment.results import write_results
from aftune.commands.experiment.shared import (
    SeedFiles,
    check_fingerprint,
    check_seeds,
    fingerprint,
    keep_config,
    run_and_clean,
    seed_steps,
)
from aftune.commands.experiment.tuning import default_lr, eval_name, selection
from aftune.commands.resumable import Steps
from aftune.config import EvalConfig
from aftune.io import atomic_write_json
from aftune.yaml_io import read_yaml_mapping

__all__ = ["CONTROL", "Experiment", "load_experiment", "grid", "run_experiment", "write_results"]


def run_experiment(
    config_path: str, out: str | None = None, quiet: bool = False, seeds: tuple[int, ...] | None = None
) -> dict:
    """Run (or resume) the study of `config_path`, then write its results and plots; returns a summary.

    A config with `arms:` is an arms study (`experiment.arms`: one align / iterate / grpo command per arm);
    otherwise it is a grid of method x seed x k x beta x lambda.
    `seeds`: run only these of the config's seeds (to spread one experiment over several processes); the
    results are then not written: a run over all seeds (which skips the finished work) writes them."""
    if "arms" in read_yaml_mapping(config_path, "experiment file").data:
        from aftune.commands.experiment.arms import run_arms  # the arms study imports iterate and grpo

        return run_arms(config_path, out=out, quiet=quiet, seeds=seeds)
    exp = load_experiment(config_path)
    if out is not None:
        exp = replace(exp, out=out)
    tune = exp.tune
    tune_seeds = tune.seeds if tune else ()
    check_seeds(seeds, exp.seeds + tune_seeds, config_path)
    # tuning seeds first: a process given both runs the trials before the runs that need their choice
    todo = tuple(s for s in (*tune_seeds, *exp.seeds) if seeds is None or s in seeds)
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
    chosen: dict[tuple[str, str], dict] = {}  # (protocol, setting) -> its tuning selection

    def tuned(r: Run, protocol: str) -> Run:
        """The test seeds' run of a cell: at its chosen lr (no lr in the name when it is the protocol's own)."""
        if tune is None:
            return r
        key = (protocol, r.setting)
        if key not in chosen:
            chosen[key] = selection(root, tune, runs_dir(protocol), r.setting)  # TuningNotDone if unfinished
        lr = chosen[key]["chosen_lr"]
        return replace(r, lr=None if lr == default_lr(plan, protocol) else lr)

    if tune is not None and not set(todo) & set(tune_seeds):
        for p in exp.protocols:  # before any work: a test seed needs every cell's choice
            for r in runs:
                tuned(r, p)

    for seed in todo:
        files = seed_steps(step, root, seed, plan, exp.data_seed, exp.bf16, quiet, kmax, exp.ks)
        ev = files.eval_args

        if seed in tune_seeds:  # the trials: every cell at every trial lr, scored on the tuning split
            for protocol, r in ((p, r) for p in exp.protocols for r in runs if r.seed == exp.seeds[0]):
                tag = "" if protocol == "continue" else f" [{protocol}]"
                for lr in tune.lrs:
                    d = trial_dir(root, seed, runs_dir(protocol), r.setting, lr)
                    name = f"{r.setting}-{lr_tag(lr)}{tag}"
                    cfg = cell_config(exp, files, replace(r, seed=seed), protocol, d, lr)
                    step(f"seed{seed}/tune {name}", d / METRICS, run_and_clean, run_align, cfg)
                    step(
                        f"seed{seed}/eval ({tune.split}) tune {name}",
                        d / eval_name(tune),
                        run_eval,
                        EvalConfig(
                            **{**ev, "split": tune.split, "candidates": None},
                            n_questions=tune.n_questions,
                            model=str(d / "model"),
                            out=str(d / eval_name(tune)),
                        ),
                    )
            continue

        for protocol, r in ((p, tuned(r, p)) for p in exp.protocols for r in runs if r.seed == seed):
            d = cell_dir(root, seed, protocol, r.cell)
            tag = "" if protocol == "continue" else f" [{protocol}]"
            cfg = cell_config(exp, files, r, protocol, d, r.lr)
            step(f"seed{seed}/align {r.cell}{tag}", d / METRICS, run_and_clean, run_align, cfg)
            step(
                f"seed{seed}/eval {r.cell}{tag}",
                d / EVAL,
                run_eval,
                EvalConfig(**ev, model=str(d / "model"), out=str(d / EVAL)),
            )

    if set(todo) != set(exp.seeds + tune_seeds):
        print(f"[experiment] seeds {list(todo)} done; run without --seeds to write the results")
        return {"results": None, "n_runs": len(runs), "skipped": skipped, "timings": timings, "cells": None}
    tuning = None
    if tune is not None:  # the results' cells: the runs at their chosen lr (one protocol: config.py checks it)
        runs = [tuned(r, exp.protocols[0]) for r in runs]
        tuning = [chosen[exp.protocols[0], r.setting] for r in runs if r.seed == exp.seeds[0]]
    results = write_results(root, report, exp, runs, tuning)
    print(f"[experiment] results: {report / 'results.md'}")
    return {
        "results": str(report / "results.md"),
        "n_runs": len(runs),
        "skipped": skipped,
        "timings": timings,
        "cells": results["cells"],
    }


def cell_config(exp: Experiment, files: SeedFiles, r: Run, protocol: str, d: Path, lr: float | None):
    """A cell's align run: the protocol's schedule (the same for every method), with the run's k / beta / lambda,
    and `lr` in place of the protocol's when given (a tuning trial, or a tuned cell)."""
    k = r.k or exp.kmax
    plan = exp.plan
    cfg = replace(
        align_config(plan, files.common, files.vft_model, files.candidates[k], files.assess, d, r.method, protocol),
        beta=r.beta if r.beta is not None else plan.beta,
        lambda_=r.lam if r.lam is not None else 1.0,
        beta_auto="gap" if r.auto else "",
        beta_floor=r.floor if r.auto else 0.02,
        max_candidates=k + 1,
        diag_every=exp.diag_every,
    )
    return cfg if lr is None else replace(cfg, lr=lr)
