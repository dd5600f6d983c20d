"""The runs of an experiment: the union of its grids, with axes a method ignores collapsed."""

from __future__ import annotations

from dataclasses import dataclass

from aftune.commands.experiment.config import CONTROL, Experiment, auto_eligible
from aftune.io import InputError
from aftune.training.methods import METHODS


@dataclass(frozen=True)
class Run:
    seed: int
    method: str  # name in METHODS
    k: int | None  # None: k does not change this method (the control)
    beta: float | None  # the margin, or the auto factor; None: method has no beta
    auto: bool
    lam: float | None  # None: no alignment term
    floor: float | None = None  # auto runs: the per-question beta's floor
    lr: float | None = None  # None: the protocol's lr (plan.align_lr / vft_lr); else a tuned one, in the name

    @property
    def cell(self) -> str:
        return self.setting + ("" if self.lr is None else f"-lr{self.lr:g}")

    @property
    def setting(self) -> str:
        """The cell's name without its lr: what the tuning chooses an lr for."""
        parts = [self.method]
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
                            r = Run(seed, base, k, beta, auto, lam, floor)
                            if (seed, r.cell) in cells:
                                if cells[seed, r.cell] != r:  # same folder, different settings
                                    raise InputError(f"run {r.cell} appears with two beta_auto floors; use one floor")
                                continue
                            cells[seed, r.cell] = r
                            runs.append(r)
    return runs
