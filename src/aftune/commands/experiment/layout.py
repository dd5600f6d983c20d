"""A study's folders and file names, and the arms study's specs: the one place both the steps that write a study
and the results writers that read it back take them from (change the layout here and both sides follow).

    OUT/experiment.json                              the fingerprint every study in OUT must match
    OUT/seed<S>/vft/                                 the seed's VFT model (its metrics.json, model/)
    OUT/seed<S>/candidates.k<K>.jsonl                the training sampling pass (+ .meta.json sidecar, .done)
    OUT/seed<S>/candidates.k<k>-of<K>.jsonl          a smaller k: the first k candidates of each group
    OUT/seed<S>/assess_candidates.jsonl              held-out candidates for the assessment metrics
    OUT/seed<S>/eval/VFT.json                        the VFT start's test eval (+ .predictions.jsonl)
    OUT/seed<S>/<runs dir>/<cell>/                   a grid cell under a protocol: metrics.json, eval.json, model/
    OUT/seed<S>/tune/<runs dir>/<setting>-lr<lr>/    a tuning trial: metrics.json, eval.<split>.json
    OUT/seed<S>/online/<arm>/                        an arm: arm.json (its spec), run/ (the command's out), eval.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aftune.commands.demo import DemoPlan

METRICS = "metrics.json"  # every training command's summary in its --out
EVAL = "eval.json"  # a cell's or an arm's test eval (its predictions next to it)
ARM_SPEC = "arm.json"
CONTROL_ARM = "control"


def fingerprint_file(root: Path) -> Path:
    return root / "experiment.json"


def seed_dir(root: Path, seed: int) -> Path:
    return root / f"seed{seed}"


def vft_dir(root: Path, seed: int) -> Path:
    return seed_dir(root, seed) / "vft"


def vft_eval(root: Path, seed: int) -> Path:
    return seed_dir(root, seed) / "eval" / "VFT.json"


def sampled_candidates(root: Path, seed: int, k: int) -> Path:
    """The seed's training sampling pass at its largest k."""
    return seed_dir(root, seed) / f"candidates.k{k}.jsonl"


def subsampled_candidates(root: Path, seed: int, k: int, kmax: int) -> Path:
    """A smaller k, cut from the k=kmax pass."""
    return seed_dir(root, seed) / f"candidates.k{k}-of{kmax}.jsonl"


def assess_candidates(root: Path, seed: int) -> Path:
    return seed_dir(root, seed) / "assess_candidates.jsonl"


def runs_dir(protocol: str) -> str:
    """A seed's folder of grid runs under a protocol (continue keeps the original name)."""
    return "runs" if protocol == "continue" else f"runs-{protocol.replace('_', '-')}"


def cell_dir(root: Path, seed: int, protocol: str, cell: str) -> Path:
    return seed_dir(root, seed) / runs_dir(protocol) / cell


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def trial_dir(root: Path, seed: int, kind: str, name: str, lr: float) -> Path:
    """A tuning trial's folder: kind is the protocol's runs folder (`runs`, `runs-from-base`)."""
    return seed_dir(root, seed) / "tune" / kind / f"{name}-{lr_tag(lr)}"


@dataclass(frozen=True)
class Arm:
    name: str
    command: str  # a key of arms.COMMANDS
    fields: dict[str, Any]  # config field name -> value, as the arm gives them (on top of the study's defaults)
    shared_candidates: bool = False  # iterate: round 1 trains on the seed's shared sampling pass

    @property
    def spec(self) -> dict:
        """What the arm asks for, as recorded in its folder (arm.json)."""
        return {"command": self.command, **self.fields, **({"candidates": "shared"} if self.shared_candidates else {})}


@dataclass(frozen=True)
class ArmsStudy:
    name: str
    out: str
    plan: DemoPlan
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    data_seed: int = 0
    sample_k: int | None = None
    diag_every: int = 0
    bf16: bool = False
    report: str | None = None

    @property
    def kmax(self) -> int:
        return self.sample_k or self.plan.k


def arm_dir(root: Path, seed: int, arm: str) -> Path:
    return seed_dir(root, seed) / "online" / arm


def arm_run_dir(arm_folder: Path) -> Path:
    """The arm's command --out, inside its folder."""
    return arm_folder / "run"
