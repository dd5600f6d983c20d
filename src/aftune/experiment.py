"""`aftune experiment CONFIG.yaml`: a grid of resumable runs (method x seed x k x beta x lambda) on `arith`.

Per seed, one VFT model, one sampling pass at max(k) (smaller k: the first k distinct candidates of each
group, written to a derived file), one held-out assessment candidate set and one VFT eval are shared by
every run of that seed. Every method is compared with the control (`vft`: same steps, same NLL batches,
no alignment term) of its own seed: mean +- std over seeds and a paired McNemar test on per-question
predictions. Each step is skipped when its output exists, so a killed experiment resumes.
See docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace


from aftune.io import InputError, atomic_write_json, iter_jsonl, write_jsonl
from aftune.pipeline import FULL, QUICK, DemoPlan, Steps, _sample_and_mark, _task_args, vft_config

CONTROL = "vft"
GRID_KEYS = ("methods", "k", "beta", "lambda", "beta_auto")
TOP_KEYS = ("name", "out", "report", "base", "data_seed", "plan", "seeds", *GRID_KEYS, "grids", "sample_k",
            "diag_every", "bf16")
AUTO_KEYS = ("mode", "factors", "floor")
METRICS = {  # results column -> (source, key)
    "test_acc": ("eval", "accuracy"),
    "assess_acc": ("assessment", "assessment_acc_macro"),
    "self_rerank": ("assessment", "best_of_k_self"),
    "ppl_pos": ("assessment", "ppl_positive"),
    "ppl_neg": ("assessment", "ppl_negative"),
}


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class AutoBeta:
    factors: tuple[float, ...]
    floor: float


@dataclass(frozen=True)
class Grid:
    """One product of axes; an experiment runs the union of its grids (shared runs once)."""
    methods: tuple[str, ...]
    ks: tuple[int, ...]
    betas: tuple[float, ...]
    lambdas: tuple[float, ...]
    auto: AutoBeta | None = None


@dataclass(frozen=True)
class Experiment:
    name: str
    out: str
    plan: DemoPlan
    seeds: tuple[int, ...]
    grids: tuple[Grid, ...]
    data_seed: int = 0
    diag_every: int = 0
    bf16: bool = False
    report: str | None = None  # where results.{md,json} and plots go (default: out)
    sample_k: int | None = None  # candidates sampled per question (default: the largest k of the grids)

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(sorted({k for g in self.grids for k in g.ks}))

    @property
    def kmax(self) -> int:
        return self.sample_k or max(self.ks)


def load_experiment(path: str | Path) -> Experiment:
    """Parse and check an experiment YAML; every mistake is an InputError naming the file (and key)."""
    from aftune.config import key_line, read_yaml_mapping

    path = Path(path)
    data = read_yaml_mapping(path)

    def err(key: str, msg: str) -> InputError:
        return InputError(msg, path, key_line(path, key.split(".")[-1]), key)

    for key in data:
        if key not in TOP_KEYS:
            raise err(str(key), f"unknown key (known: {', '.join(TOP_KEYS)})")

    base = data.get("base", "full")
    if base not in ("quick", "full"):
        raise err("base", f"expected quick or full, got {base!r}")
    plan = QUICK if base == "quick" else FULL
    overrides = data.get("plan") or {}
    if not isinstance(overrides, dict):
        raise err("plan", "expected a mapping of DemoPlan fields to values")
    fields = {f.name: f for f in dataclasses.fields(DemoPlan)}
    typed = {}
    for key, value in overrides.items():
        if key not in fields:
            raise err(f"plan.{key}", f"unknown plan field (known: {', '.join(fields)})")
        want = {"int": int, "float": float, "str": str}[str(fields[key].type)]
        if isinstance(value, bool) or not (isinstance(value, want) or want is float and isinstance(value, int)):
            raise err(f"plan.{key}", f"expected {want.__name__}, got {type(value).__name__}")
        if want is not str and not value > 0:
            raise err(f"plan.{key}", f"must be > 0, got {value}")
        typed[key] = want(value)
    plan = replace(plan, **typed)

    seeds = _num_list(data, "seeds", int, [0], err)
    top = _grid(data, "", err, Grid((CONTROL,), (plan.k,), (plan.beta,), (1.0,)))
    grids = [top]
    subs = data.get("grids", [])
    if not isinstance(subs, list) or not all(isinstance(g, dict) for g in subs):
        raise err("grids", "expected a list of mappings (each: methods, k, beta, lambda, beta_auto)")
    for i, sub in enumerate(subs):
        for key in sub:
            if key not in GRID_KEYS:
                raise err(f"grids[{i}].{key}", f"unknown key (known: {', '.join(GRID_KEYS)})")
        grids.append(_grid(sub, f"grids[{i}].", err, top))

    name = str(data.get("name", path.stem))
    out = data.get("out", f"runs/experiments/{name}")
    for key, kind in (("data_seed", int), ("diag_every", int), ("bf16", bool), ("sample_k", int)):
        if key in data and (not isinstance(data[key], kind) or kind is int and isinstance(data[key], bool)):
            raise err(key, f"expected {kind.__name__}, got {type(data[key]).__name__}")
    if data.get("diag_every", 0) < 0:
        raise err("diag_every", "must be >= 0")
    grids = tuple(grids[1:] if subs else grids)  # with sub-grids the top-level axes are only their defaults
    sample_k = data.get("sample_k")
    if sample_k is not None and sample_k < max(k for g in grids for k in g.ks):
        raise err("sample_k", f"must be >= every k of the grids, got {sample_k}")
    report = data.get("report")
    if report is not None and not isinstance(report, str):
        raise err("report", f"expected a folder path, got {type(report).__name__}")
    return Experiment(name=name, out=str(out), plan=plan, seeds=seeds, grids=grids,
                      data_seed=int(data.get("data_seed", 0)), diag_every=int(data.get("diag_every", 0)),
                      bf16=bool(data.get("bf16", False)), report=report, sample_k=sample_k)


def _num_list(data: dict, key: str, kind: type, default: list, err, where: str = "") -> tuple:
    v = data.get(key, default)
    v = v if isinstance(v, list) else [v]
    ok = (lambda x: isinstance(x, int) and not isinstance(x, bool)) if kind is int else \
        (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))
    if not v or not all(ok(x) for x in v):
        raise err(where + key, f"expected a non-empty list of {kind.__name__}s, got {v!r}")
    if len(set(v)) != len(v):
        raise err(where + key, f"repeated values in {v!r}")
    return tuple(kind(x) for x in v)


def _grid(data: dict, where: str, err, inherit: Grid) -> Grid:
    """The axes of one grid; a missing axis takes `inherit`'s."""
    from aftune.training.methods import METHODS

    methods = list(inherit.methods)
    if "methods" in data:
        methods = data["methods"]
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            raise err(where + "methods", f"expected a non-empty list of method names, got {methods!r}")
        for m in methods:
            if m not in METHODS:
                raise err(where + "methods", f"unknown method '{m}' (choose from: {', '.join(METHODS)})")
        if len(set(methods)) != len(methods):
            raise err(where + "methods", f"repeated methods in {methods!r}")
    methods = [CONTROL] + [m for m in methods if m != CONTROL]  # the control is always run

    ks = _num_list(data, "k", int, list(inherit.ks), err, where)
    if min(ks) < 2:
        raise err(where + "k", f"every k must be >= 2, got {list(ks)}")
    betas = _num_list(data, "beta", float, list(inherit.betas), err, where)
    lambdas = _num_list(data, "lambda", float, list(inherit.lambdas), err, where)
    for key, vals in (("beta", betas), ("lambda", lambdas)):
        if min(vals) <= 0:
            raise err(where + key, f"every value must be > 0, got {list(vals)}")

    auto = inherit.auto
    if "beta_auto" in data:
        spec = data["beta_auto"]
        spec = {"mode": spec} if isinstance(spec, str) else spec
        if spec is None:
            auto = None
        elif not isinstance(spec, dict):
            raise err(where + "beta_auto", "expected 'gap' or a mapping {mode: gap, factors: [...], floor: ...}")
        else:
            for key in spec:
                if key not in AUTO_KEYS:
                    raise err(f"{where}beta_auto.{key}", f"unknown key (known: {', '.join(AUTO_KEYS)})")
            if spec.get("mode", "gap") != "gap":
                raise err(where + "beta_auto.mode", f"only 'gap' is implemented, got {spec.get('mode')!r}")
            factors = spec.get("factors", [2.0])
            factors = factors if isinstance(factors, list) else [factors]
            floor = spec.get("floor", 0.02)
            if not factors or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors):
                raise err(where + "beta_auto.factors", f"expected a list of numbers > 0, got {factors!r}")
            if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor > 0:
                raise err(where + "beta_auto.floor", f"expected a number > 0, got {floor!r}")
            auto = AutoBeta(tuple(float(f) for f in factors), float(floor))
    if auto is not None and not any(auto_eligible(m) for m in methods):
        raise err(where + "beta_auto", "no method in the grid takes a per-question beta "
                  f"(one of: {', '.join(m for m in METHODS if auto_eligible(m))})")
    return Grid(tuple(methods), ks, betas, lambdas, auto)


# --------------------------------------------------------------------------- grid

@dataclass(frozen=True)
class Run:
    seed: int
    method: str  # name in METHODS (a registered auto-beta method for `auto` runs)
    base: str  # the method as the user named it
    k: int | None  # None: k does not change this method (the control)
    beta: float | None  # the margin, or the auto factor; None: method has no beta
    auto: bool
    lam: float | None  # None: no alignment term
    floor: float | None = None  # auto runs: the per-question beta's floor

    @property
    def cell(self) -> str:
        parts = [self.base]
        if self.k is not None:
            parts.append(f"k{self.k}")
        if self.beta is not None:
            parts.append(f"gap{self.beta:g}" if self.auto else f"b{self.beta:g}")
        if self.lam is not None:
            parts.append(f"l{self.lam:g}")
        return "-".join(parts)

    @property
    def beta_label(self) -> str | None:
        if self.beta is None:
            return None
        return f"gap x{self.beta:g}" if self.auto else f"{self.beta:g}"


def grid(exp: Experiment) -> list[Run]:
    """Every distinct run, seed by seed; axes a method ignores collapse (the control runs once per seed)."""
    from aftune.training.methods import METHODS

    runs: list[Run] = []
    cells: dict[str, Run] = {}
    for seed in exp.seeds:
        for g in exp.grids:
            for base in g.methods:
                m = METHODS[base]
                ks = [None] if base == CONTROL else list(g.ks)
                betas = [(b, False) for b in g.betas] if m.uses_beta else [(None, False)]
                if g.auto and auto_eligible(base):
                    betas += [(f, True) for f in g.auto.factors]
                lams = list(g.lambdas) if m.loss is not None else [None]
                for k in ks:
                    for beta, auto in betas:
                        for lam in lams:
                            floor = g.auto.floor if auto else None
                            r = Run(seed, auto_method(base, floor) if auto else base, base, k, beta, auto, lam, floor)
                            if (seed, r.cell) in cells:
                                if cells[seed, r.cell] != r:  # same folder, different settings
                                    raise InputError(f"run {r.cell} appears with two beta_auto floors; use one floor")
                                continue
                            cells[seed, r.cell] = r
                            runs.append(r)
    return runs


# --------------------------------------------------------------------------- per-question beta (beta_auto: gap)

def auto_eligible(name: str) -> bool:
    """Methods whose beta is a margin on per-token scores (BC terms); DPO's is in reward units."""
    from aftune.training.methods import METHODS

    m = METHODS.get(name)
    return m is not None and m.uses_beta and not m.needs_reference_logps and m.loss is not None


def gap_beta(pos: list[float], neg: list[float], factor: float, floor: float) -> float:
    """max(floor, factor * median_n(min_p s_p - s_n)) over one question's VFT scores (nats/token):
    the boundary B = min_p s_p - beta then starts `factor` times as far below the weakest positive as the
    median negative sits under the VFT model. Without both kinds: floor (the loss is 0 there anyway)."""
    if not pos or not neg:
        return floor
    weakest = min(pos)
    return max(floor, factor * statistics.median(weakest - s for s in neg))


def auto_method(base: str, floor: float) -> str:
    """Register (in this process) `<base>+gap<floor>`: the base loss with a per-question beta from gap_beta,
    cfg.beta being the factor. The VFT scores arrive as DPO-style reference log-probs (summed, computed once
    by `aftune align` with the start model and cached next to the candidates)."""
    import torch

    from aftune.training.methods import METHODS, GroupBatch, Method

    name = f"{base}+gap{floor:g}"
    m = METHODS[base]

    def loss(scored, batch, cfg):
        # summed -> per-token VFT scores: the token count is sum/mean of the current model's scores
        s_sum, s_mean = scored.sum_padded.detach(), scored.mean_padded.detach()
        known = batch.valid & (s_sum != 0)
        vft = torch.where(known, batch.ref_logps * s_mean / torch.where(known, s_sum, torch.ones_like(s_sum)),
                          torch.zeros_like(s_sum))
        rows = []
        for b in range(s_sum.shape[0]):
            pos = vft[b][known[b] & batch.positive[b]].tolist()
            neg = vft[b][known[b] & ~batch.positive[b]].tolist()
            row = slice(b, b + 1)
            rows.append(m.loss(SimpleNamespace(mean_padded=scored.mean_padded[row], sum_padded=scored.sum_padded[row]),
                               GroupBatch(batch.positive[row], batch.ranks[row], batch.valid[row], batch.ref_logps[row]),
                               SimpleNamespace(beta=gap_beta(pos, neg, cfg.beta, floor), dpo_beta=cfg.dpo_beta)))
        return torch.cat(rows)

    METHODS[name] = Method(name, f"{m.help}; per-question beta = max({floor:g}, beta x median VFT gap)", loss,
                           feedback=m.feedback, needs_reference_logps=True, uses_beta=True, nll_data=m.nll_data)
    return name


def auto_beta_summary(candidates: Path, factor: float, floor: float) -> dict:
    """The per-question betas a factor gives on a candidates file (scores there are under the VFT model;
    sampled candidates only, so the reference's score is not in the min)."""
    from aftune.sampling.store import read_groups

    betas = [gap_beta([c.score for c in g.candidates if c.correct and c.score is not None],
                      [c.score for c in g.candidates if not c.correct and c.score is not None], factor, floor)
             for g in read_groups(candidates) if g.mixed]
    if not betas:
        return {"n_mixed": 0}
    q = statistics.quantiles(betas, n=4) if len(betas) > 1 else [betas[0]] * 3
    return {"n_mixed": len(betas), "median": statistics.median(betas), "q1": q[0], "q3": q[2],
            "frac_at_floor": sum(b == floor for b in betas) / len(betas)}


# --------------------------------------------------------------------------- candidates

def subsample_candidates(src: Path, dst: Path, k: int) -> None:
    """dst = src with the first k (distinct) candidates per group, ranks recomputed on the subset."""
    from aftune.sampling.store import group_stats, meta_path_for, read_groups
    from aftune.tasks.feedback import assign_ranks

    groups = read_groups(src)
    for g in groups:
        g.candidates = g.candidates[:k]
        assign_ranks(g.candidates)
        g.meta = {**g.meta, "k": k, "derived_from": src.name}
    meta = json.loads(meta_path_for(src).read_text())
    meta["sampling"] = {**meta.get("sampling", {}), "k": k}
    meta.update(derived_from=src.name, stats=group_stats(groups))
    write_jsonl(dst, [g.to_dict() for g in groups])
    atomic_write_json(meta_path_for(dst), meta)


# --------------------------------------------------------------------------- running

def _fingerprint(exp: Experiment) -> dict:
    # what every shared output depends on: changing it under an existing folder would mix results
    return {"plan": dataclasses.asdict(exp.plan), "data_seed": exp.data_seed, "bf16": exp.bf16,
            "max_k": exp.kmax, "diag_every": exp.diag_every}


def run_experiment(config_path: str, out: str | None = None, quiet: bool = False,
                   seeds: tuple[int, ...] | None = None) -> dict:
    """Run (or resume) the grid of `config_path`, then write results.{md,json} and plots; returns a summary.

    `seeds`: run only these of the config's seeds (to spread one experiment over several processes); the
    results are then not written: a run over all seeds (which skips the finished work) writes them."""
    from aftune.config import EvalConfig, SampleConfig
    from aftune.pipeline import align_config
    from aftune.steps import run_eval, run_sample
    from aftune.training.run import run_align, run_sft

    exp = load_experiment(config_path)
    if out is not None:
        exp = replace(exp, out=out)
    if seeds is not None and not set(seeds) <= set(exp.seeds):
        raise InputError(f"--seeds {list(seeds)} is not a subset of the config's seeds {list(exp.seeds)}",
                         config_path, field="seeds")
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
            raise InputError(f"{root} holds an experiment run with different {', '.join(diff)}; "
                             "use a new `out` (methods, seeds, smaller k, beta and lambda may be added freely)",
                             config_path, field=diff[0] if diff else None)
    else:
        atomic_write_json(fp_path, {"fingerprint": fp})  # what every experiment sharing this folder must match
    runs = grid(exp)
    atomic_write_json(report / "grid.json", {"config": str(config_path), "name": exp.name, "out": str(root),
                                              "grid": [dataclasses.asdict(r) for r in runs]})
    if Path(config_path).resolve() != (report / "experiment.yaml").resolve():
        shutil.copyfile(config_path, report / "experiment.yaml")  # the config as given, next to its results

    plan = exp.plan
    step = Steps(root, "experiment", announce_skips=not quiet)
    timings, skipped = step.timings, step.skipped

    kmax = exp.kmax
    for seed in seeds if seeds is not None else exp.seeds:
        sd = root / f"seed{seed}"
        common = dict(task="arith", task_args=_task_args(plan, exp.data_seed), seed=seed, quiet=quiet, bf16=exp.bf16)
        vft = sd / "vft"
        step(f"seed{seed}/sft (VFT start)", vft / "metrics.json", run_sft, vft_config(plan, common, vft))
        vft_model = str(vft / "model")
        sample = dict(**common, model=vft_model, temperature=plan.temperature, max_new_tokens=plan.max_new_tokens,
                      batch_size=32)
        cands = {kmax: sd / f"candidates.k{kmax}.jsonl"}
        assess = sd / "assess_candidates.jsonl"
        step(f"seed{seed}/sample (train, k={kmax})", cands[kmax].with_suffix(".done"), _sample_and_mark, run_sample,
             SampleConfig(**sample, k=kmax, out=str(cands[kmax]), split="train", n_questions=plan.n_sample))
        step(f"seed{seed}/sample (assess)", assess.with_suffix(".done"), _sample_and_mark, run_sample,
             SampleConfig(**sample, k=plan.k, out=str(assess), split="validation", n_questions=plan.n_assess))
        for k in exp.ks:
            if k != kmax:
                cands[k] = sd / f"candidates.k{k}-of{kmax}.jsonl"
                step(f"seed{seed}/candidates k={k}", cands[k], subsample_candidates, cands[kmax], cands[k], k)
        ev = dict(**common, split="test", batch_size=64, max_new_tokens=plan.max_new_tokens, candidates=str(assess))
        step(f"seed{seed}/eval VFT (start)", sd / "eval" / "VFT.json", run_eval,
             EvalConfig(**ev, model=vft_model, out=str(sd / "eval" / "VFT.json")))

        for r in (r for r in runs if r.seed == seed):
            d = sd / "runs" / r.cell
            if r.auto:
                auto_method(r.base, r.floor)  # registered in this process before align reads METHODS
            k = r.k or kmax
            # the demo's continuation (same schedule for every method), with this run's k / beta / lambda
            cfg = replace(align_config(plan, common, vft_model, cands[k], assess, d, r.method),
                          beta=r.beta if r.beta is not None else plan.beta, lambda_=r.lam if r.lam is not None else 1.0,
                          max_candidates=k + 1, diag_every=exp.diag_every)
            step(f"seed{seed}/align {r.cell}", d / "metrics.json", _align_and_clean, run_align, cfg)
            step(f"seed{seed}/eval {r.cell}", d / "eval.json", run_eval,
                 EvalConfig(**ev, model=str(d / "model"), out=str(d / "eval.json")))

    if seeds is not None and set(seeds) != set(exp.seeds):
        print(f"[experiment] seeds {list(seeds)} done; run without --seeds to write the results")
        return {"results": None, "n_runs": len(runs), "skipped": skipped, "timings": timings, "cells": None}
    results = write_results(root, report, exp, runs)
    print(f"[experiment] results: {report / 'results.md'}")
    return {"results": str(report / "results.md"), "n_runs": len(runs), "skipped": skipped, "timings": timings,
            "cells": results["cells"]}


def _align_and_clean(run_align, cfg) -> None:
    # a finished run keeps only its model: its checkpoints (weights + optimiser state) are for resuming
    run_align(cfg)
    shutil.rmtree(Path(cfg.out) / "checkpoints", ignore_errors=True)


# --------------------------------------------------------------------------- statistics

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs b (only A right) and c (only B right) are
    Binomial(b + c, 1/2) under H0; p = min(1, 2 * P(X <= min(b, c)))."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def paired_test(pairs: list[tuple[dict[str, bool], dict[str, bool]]]) -> dict:
    """Method vs control over matched (same seed, same question) predictions, pooled over seeds.

    pairs: one (method {id: correct}, control {id: correct}) per seed. Returns discordant counts b (method
    right, control wrong) and c, the exact McNemar p on the pooled counts, and the mean per-question
    difference d in {-1, 0, 1} (accuracy points as a fraction) with its standard error sd(d)/sqrt(n).
    """
    b = c = n = 0
    per_seed = []
    for method, control in pairs:
        if set(method) != set(control):
            raise ValueError("method and control were evaluated on different questions")
        bs = sum(method[q] and not control[q] for q in method)
        cs = sum(control[q] and not method[q] for q in method)
        b, c, n = b + bs, c + cs, n + len(method)
        per_seed.append((bs - cs) / len(method) if method else None)
    mean = (b - c) / n if n else None
    se = math.sqrt(((b + c) - n * mean ** 2) / (n - 1) / n) if n > 1 else None
    return {"b": b, "c": c, "n": n, "diff": mean, "se": se, "p": mcnemar_exact(b, c), "diff_per_seed": per_seed}


def _summary(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals), "values": values}


# --------------------------------------------------------------------------- results

def _predictions(eval_json: Path) -> dict[str, bool]:
    return {str(o["id"]): bool(o["correct"]) for _, o in iter_jsonl(eval_json.with_suffix(".predictions.jsonl"))}


def _metrics(eval_json: Path) -> dict[str, float | None]:
    ev = json.loads(eval_json.read_text())
    src = {"eval": ev, "assessment": ev.get("assessment") or {}}
    return {col: src[s].get(key) for col, (s, key) in METRICS.items()}


def write_results(root: Path, report: Path, exp: Experiment, runs: list[Run]) -> dict:
    """report/results.json, results.md and plots from the files the runs wrote under root (rerunnable)."""
    from aftune.evaluation.report import markdown_image, markdown_table, write_report

    cells: dict[str, list[Run]] = {}
    for r in runs:
        cells.setdefault(r.cell, []).append(r)
    control_eval = {s: root / f"seed{s}" / "runs" / CONTROL / "eval.json" for s in exp.seeds}
    out_cells = []

    def cell_entry(name: str, method: str, evals: dict[int, Path], r: Run | None) -> dict:
        per_seed = {s: _metrics(p) for s, p in evals.items()}
        entry = {"cell": name, "method": method, "k": r.k if r else None, "beta": r.beta_label if r else None,
                 "lambda": r.lam if r else None, "seeds": list(evals),
                 "metrics": {col: _summary([per_seed[s][col] for s in evals]) for col in METRICS}}
        if name != CONTROL:
            entry["vs_control"] = paired_test([(_predictions(p), _predictions(control_eval[s])) for s, p in evals.items()])
        return entry

    out_cells.append(cell_entry("VFT", "VFT (start)", {s: root / f"seed{s}" / "eval" / "VFT.json" for s in exp.seeds}, None))
    for name, rs in cells.items():
        out_cells.append(cell_entry(name, rs[0].base, {r.seed: root / f"seed{r.seed}" / "runs" / name / "eval.json"
                                                       for r in rs}, rs[0]))

    auto = {}
    kmax = exp.kmax
    for f, floor in sorted({(r.beta, r.floor) for r in runs if r.auto}):
        auto[f"gap x{f:g}, floor {floor:g}"] = {
            f"seed{s}": auto_beta_summary(root / f"seed{s}" / f"candidates.k{kmax}.jsonl", f, floor) for s in exp.seeds}
    results = {"name": exp.name, "plan": dataclasses.asdict(exp.plan), "seeds": list(exp.seeds),
               "data_seed": exp.data_seed, "control": CONTROL, "cells": out_cells, "auto_beta": auto}
    atomic_write_json(report / "results.json", results)

    def pm(m: dict, scale: float = 1.0, fmt: str = ".1f") -> str | None:
        if m["mean"] is None:
            return None
        s = format(m["mean"] * scale, fmt)
        return s + (f" ± {format(m['std'] * scale, fmt)}" if m["std"] is not None else "")

    rows = []
    for c in out_cells:
        m, t = c["metrics"], c.get("vs_control")
        rows.append({"cell": c["cell"], "method": c["method"], "k": c["k"], "beta": c["beta"], "lambda": c["lambda"],
                     "seeds": len(c["seeds"]), "test acc %": pm(m["test_acc"], 100), "assess acc %": pm(m["assess_acc"], 100),
                     "self-rerank %": pm(m["self_rerank"], 100), "ppl pos": pm(m["ppl_pos"], fmt=".3f"),
                     "ppl neg": pm(m["ppl_neg"], fmt=".3f"),
                     "Δ vs control (pts)": None if not t or t["diff"] is None else f"{100 * t['diff']:+.1f} ± {100 * (t['se'] or 0):.1f}",
                     "b / c": None if not t else f"{t['b']} / {t['c']}",
                     "p (McNemar)": None if not t else f"{t['p']:.3g}"})
    cols = list(rows[0])
    plots = write_plots(report, out_cells, exp)
    sections = [("Results", markdown_table(rows, cols, {"lambda": "g"}) + f"""
Mean ± std over {len(exp.seeds)} VFT seed(s) {list(exp.seeds)} (data seed {exp.data_seed}: every seed sees the same
questions). **test acc**: greedy accuracy on {exp.plan.n_test} test questions. **assess acc**: assessment accuracy
(macro) on held-out candidates sampled from that seed's VFT model; **self-rerank**: accuracy when the model picks its
own top-scored held-out candidate; **ppl pos / neg**: mean perplexity of correct / wrong held-out candidates.
**Δ vs control**: mean per-question accuracy difference to the control (`vft`: same steps and NLL batches, no
alignment term) of the same seed, pooled over seeds, ± its standard error; **b / c**: questions only the method /
only the control got right; **p**: exact two-sided McNemar test on the pooled discordant counts. The `VFT` row is the
start checkpoint (compared with the control it shows what the extra steps alone bring)."""),
                ("Plots", "\n\n".join(markdown_image(p, alt, report) for p, alt in plots) or "None.")]
    if auto:
        arows = [{"factor": f, "seed": s, **v} for f, per in auto.items() for s, v in per.items()]
        sections.append(("Per-question beta (beta_auto: gap)", markdown_table(
            arows, ["factor", "seed", "n_mixed", "median", "q1", "q3", "frac_at_floor"], {"frac_at_floor": ".0%"})
            + "\nbeta_q = max(floor, factor x median over negatives of (weakest positive - negative)) "
              "under the VFT model, on mixed training questions (sampled candidates; in training the reference also "
              "counts as a positive)."))
    sections.append(("Plan", "```\n" + json.dumps(dataclasses.asdict(exp.plan), indent=1) + "\n```"))
    write_report(report / "results.md", f"aftune experiment: {exp.name}", sections)
    return results


def write_plots(root: Path, cells: list[dict], exp: Experiment) -> list[tuple[Path, str]]:
    from aftune.evaluation.plots import _pyplot, _save

    plt = _pyplot()
    out: list[tuple[Path, str]] = []
    acc = {c["cell"]: c["metrics"]["test_acc"] for c in cells}
    control = acc.get(CONTROL, {}).get("mean")

    def err(m: dict) -> float:
        return 100 * (m["std"] or 0.0)

    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cells) + 2), 4.5))
    names = [c["cell"] for c in cells if acc[c["cell"]]["mean"] is not None]
    ax.bar(range(len(names)), [100 * acc[n]["mean"] for n in names], yerr=[err(acc[n]) for n in names], capsize=3,
           color=["tab:gray" if n in ("VFT", CONTROL) else "tab:blue" for n in names])
    if control is not None:
        ax.axhline(100 * control, color="black", linestyle="--", linewidth=1, label="control mean")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{exp.name}: accuracy per run configuration")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.append((_save(fig, root / "plots" / "accuracy.png"), "test accuracy per configuration (error bars: std over seeds)"))

    # The paired view: seeds differ far more from each other than methods from their seed's control, so
    # the std bars above hide what the study measures. Per cell: pooled difference to the control with a
    # 95% interval (1.96 SE), and each seed's own difference as a dot.
    def delta(c: dict) -> tuple[float, float] | None:  # (difference, 95% half-width) in points
        t = c.get("vs_control")
        return None if not t or t["diff"] is None else (100 * t["diff"], 196 * (t["se"] or 0.0))

    paired = [(c, delta(c)) for c in cells if delta(c) is not None]
    if paired:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(paired) + 2), 4.5))
        x = range(len(paired))
        colors = ["tab:gray" if c["cell"] == "VFT" else "tab:green" if d - e > 0 else "tab:red" if d + e < 0
                  else "tab:blue" for c, (d, e) in paired]  # green / red: the interval excludes 0
        ax.bar(x, [d for _, (d, _) in paired], yerr=[e for _, (_, e) in paired], capsize=3, color=colors)
        for i, (c, _) in enumerate(paired):
            per = [100 * v for v in c["vs_control"]["diff_per_seed"] if v is not None]
            ax.plot([i] * len(per), per, "o", color="black", markersize=3, alpha=0.7)
        ax.axhline(0, color="black", linewidth=1)
        ax.set_xticks(list(x))
        ax.set_xticklabels([c["cell"] for c, _ in paired], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy minus control (points)")
        ax.set_title(f"{exp.name}: paired difference to the control (bars: pooled ± 95% CI; dots: seeds)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        out.append((_save(fig, root / "plots" / "delta_vs_control.png"),
                    "difference to the same seed's control (pooled over seeds, 95% interval; dots: single seeds)"))

    def lines(axis: str, path: str, title: str, xlabel: str, log: bool) -> None:
        # paired differences to the control (see delta_vs_control.png): seed spread would swamp raw accuracy
        groups: dict[tuple, list[tuple[float, tuple[float, float]]]] = {}
        flat: dict[str, tuple[float, float]] = {}
        for c in cells:
            if c["cell"] in ("VFT", CONTROL) or delta(c) is None:
                continue
            if axis == "beta" and c["beta"] is not None and c["beta"].startswith("gap"):
                flat[c["cell"]] = delta(c)  # a per-question beta has no position on the beta axis
                continue
            x = c["k"] if axis == "k" else (float(c["beta"]) if c["beta"] is not None else None)
            if x is None:
                continue
            key = (c["method"],) + tuple(c[a] for a in ("k", "beta", "lambda") if a != axis)
            groups.setdefault(key, []).append((x, delta(c)))
        groups = {g: sorted(v, key=lambda p: p[0]) for g, v in groups.items() if len({x for x, _ in v}) > 1}
        if not groups:
            return
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, (g, pts) in enumerate(groups.items()):
            label = " ".join(f"{a}={v}" for a, v in zip(("method",) + tuple(a for a in ("k", "beta", "lambda") if a != axis), g)
                             if v is not None)
            ax.errorbar([x for x, _ in pts], [d for _, (d, _) in pts], yerr=[e for _, (_, e) in pts],
                        marker="o", capsize=3, color=f"C{i % 10}", label=label)
        for j, (name, (d, e)) in enumerate(flat.items()):
            color = f"C{(len(groups) + j) % 10}"
            ax.axhline(d, color=color, linestyle=":", linewidth=1.2, label=f"{name} (± {e:.1f})")
        ax.axhline(0, color="black", linestyle="--", linewidth=1, label="control")
        if log:
            ax.set_xscale("log")
            xs = sorted({x for pts in groups.values() for x, _ in pts})
            ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the grid's values, not log-scale decades
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy minus control (points), ± 95% CI")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append((_save(fig, root / "plots" / path), title))

    lines("k", "accuracy_vs_k.png", "Accuracy vs k: difference to the control", "k", True)
    lines("beta", "accuracy_vs_beta.png", "Accuracy vs beta: difference to the control", "beta (nats per token, log scale)", True)
    return out
