"""The experiment YAML: a plan (the demo's, with overrides), seeds, and grids of method x k x beta x lambda
(and the per-question beta of `beta_auto: gap`). Every mistake is an InputError naming the file and key."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from aftune.commands.demo import FULL, PROTOCOLS, QUICK, DemoPlan
from aftune.commands.experiment.tuning import Tune, parse_tune
from aftune.config import field_types, typed_value
from aftune.training.arguments import auto_beta_eligible
from aftune.training.methods import METHODS
from aftune.yaml_io import YamlDoc, read_yaml_mapping

CONTROL = "vft"
GRID_KEYS = ("methods", "k", "beta", "lambda", "beta_auto")
TOP_KEYS = (
    "name",
    "out",
    "report",
    "base",
    "data_seed",
    "plan",
    "seeds",
    "protocols",
    *GRID_KEYS,
    "grids",
    "sample_k",
    "diag_every",
    "bf16",
    "tune",
)
AUTO_KEYS = ("mode", "factors", "floor")


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
    protocols: tuple[str, ...] = ("continue",)  # demo.PROTOCOLS: every run of the grids under each
    tune: Tune | None = None  # the lr of every cell chosen on validation by tuning seeds (experiment.tuning)

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(sorted({k for g in self.grids for k in g.ks}))

    @property
    def kmax(self) -> int:
        return self.sample_k or max(self.ks)


def load_experiment(path: str | Path) -> Experiment:
    """Parse and check an experiment YAML; every mistake is an InputError naming the file (and key)."""
    path = Path(path)
    doc = read_yaml_mapping(path, "experiment file")
    data, err = doc.data, doc.error

    for key in data:
        if key not in TOP_KEYS:
            raise err(str(key), f"unknown key (known: {', '.join(TOP_KEYS)})")

    plan = parse_plan(doc)
    seeds = num_list(data, "seeds", int, [0], err)
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
    check_scalars(data, err)
    grids = tuple(grids[1:] if subs else grids)  # with sub-grids the top-level axes are only their defaults
    sample_k = data.get("sample_k")
    if sample_k is not None and sample_k < max(k for g in grids for k in g.ks):
        raise err("sample_k", f"must be >= every k of the grids, got {sample_k}")
    protocols = data.get("protocols", ["continue"])
    protocols = protocols if isinstance(protocols, list) else [protocols]
    known = all(isinstance(p, str) and p in PROTOCOLS for p in protocols)
    if not protocols or not known or len(set(protocols)) != len(protocols):
        raise err("protocols", f"expected distinct protocols from: {', '.join(PROTOCOLS)}; got {protocols!r}")
    report = parse_report(data, err)
    if "tune" in data and len(protocols) > 1:
        raise err("tune", "a tuned study takes one protocol (one study per protocol)")
    return Experiment(
        name=name,
        out=str(out),
        plan=plan,
        seeds=seeds,
        grids=grids,
        data_seed=int(data.get("data_seed", 0)),
        diag_every=int(data.get("diag_every", 0)),
        bf16=bool(data.get("bf16", False)),
        report=report,
        sample_k=sample_k,
        protocols=tuple(protocols),
        tune=parse_tune(data, err, seeds),
    )


def parse_plan(doc: YamlDoc) -> DemoPlan:
    """`base` (quick | full) with the `plan` overrides of its DemoPlan fields."""
    data, err = doc.data, doc.error
    base = data.get("base", "full")
    if base not in ("quick", "full"):
        raise err("base", f"expected quick or full, got {base!r}")
    plan = QUICK if base == "quick" else FULL
    overrides = data.get("plan") or {}
    if not isinstance(overrides, dict):
        raise err("plan", "expected a mapping of DemoPlan fields to values")
    fields = field_types(DemoPlan)
    typed = {}
    for key, value in overrides.items():
        if key not in fields:
            raise err(f"plan.{key}", f"unknown plan field (known: {', '.join(fields)})")
        want, _ = fields[key]
        typed[key] = typed_value(value, want, False, doc, f"plan.{key}", strict_str=True)
        if want is not str and not value > 0:
            raise err(f"plan.{key}", f"must be > 0, got {value}")
    return replace(plan, **typed)


def check_scalars(data: dict, err) -> None:
    """The types of the scalar keys every study kind has (data_seed, diag_every, bf16, sample_k)."""
    for key, kind in (("data_seed", int), ("diag_every", int), ("bf16", bool), ("sample_k", int)):
        if key in data and (not isinstance(data[key], kind) or kind is int and isinstance(data[key], bool)):
            raise err(key, f"expected {kind.__name__}, got {type(data[key]).__name__}")
    if data.get("diag_every", 0) < 0:
        raise err("diag_every", "must be >= 0")


def parse_report(data: dict, err) -> str | None:
    report = data.get("report")
    if report is not None and not isinstance(report, str):
        raise err("report", f"expected a folder path, got {type(report).__name__}")
    return report


def num_list(data: dict, key: str, kind: type, default: list, err, where: str = "") -> tuple:
    v = data.get(key, default)
    v = v if isinstance(v, list) else [v]
    ok = (
        (lambda x: isinstance(x, int) and not isinstance(x, bool))
        if kind is int
        else (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))
    )
    if not v or not all(ok(x) for x in v):
        raise err(where + key, f"expected a non-empty list of {kind.__name__}s, got {v!r}")
    if len(set(v)) != len(v):
        raise err(where + key, f"repeated values in {v!r}")
    return tuple(kind(x) for x in v)


def _grid(data: dict, where: str, err, inherit: Grid) -> Grid:
    """The axes of one grid; a missing axis takes `inherit`'s."""
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

    ks = num_list(data, "k", int, list(inherit.ks), err, where)
    if min(ks) < 2:
        raise err(where + "k", f"every k must be >= 2, got {list(ks)}")
    betas = num_list(data, "beta", float, list(inherit.betas), err, where)
    lambdas = num_list(data, "lambda", float, list(inherit.lambdas), err, where)
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
            if not factors or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors
            ):
                raise err(where + "beta_auto.factors", f"expected a list of numbers > 0, got {factors!r}")
            if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor > 0:
                raise err(where + "beta_auto.floor", f"expected a number > 0, got {floor!r}")
            auto = AutoBeta(tuple(float(f) for f in factors), float(floor))
    if auto is not None and not any(auto_eligible(m) for m in methods):
        raise err(
            where + "beta_auto",
            "no method in the grid takes a per-question beta "
            f"(one of: {', '.join(m for m in METHODS if auto_eligible(m))})",
        )
    return Grid(tuple(methods), ks, betas, lambdas, auto)


def auto_eligible(name: str) -> bool:
    """Methods that take a per-question beta (`beta_auto`): BC-style margins on per-token scores."""
    m = METHODS.get(name)
    return m is not None and auto_beta_eligible(m)
