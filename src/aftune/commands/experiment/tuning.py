"""An equal tuning budget per method: the `tune:` block of an experiment or arms study.

    tune:
      lr: [1.0e-5, 3.0e-5, 1.0e-4, 3.0e-4]   # the trial learning rates, the same number for every method
      seeds: [3]                             # tuning seeds: their own VFT model each, never a test seed
      split: validation                      # the split the trials are scored on (never test)
      n_questions: 200                       # its first N questions (default: all)

Grid studies only (one protocol); the arms study (iterate, grpo) has no `tune:` yet. Every method (grid cell)
trains once per trial lr on each tuning seed, from that seed's VFT model, and is scored by greedy accuracy on
`split`; its chosen lr is the one with the highest mean accuracy over the tuning seeds (ties: the smaller lr, the
smaller departure from the start model). The test seeds then run each cell once at its chosen lr (in the cell's
usual folder when that is the protocol's own lr, so untuned studies' runs are shared; else `<cell>-lr<lr>`).
Trials live in OUT/seed<T>/tune/<runs folder>/<cell>-lr<lr>/ (model, metrics.json, eval.<split>.json with
predictions), so a killed tuning stage resumes like any run, and processes for the tuning seeds and for other
studies' seeds can run side by side. A process for test seeds only refuses to start before the tuning is
finished (`TuningNotDone`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from aftune.commands.experiment.layout import METRICS, arm_run_dir, trial_dir
from aftune.io import InputError

TUNE_KEYS = ("lr", "seeds", "split", "n_questions")
SPLITS = ("validation",)  # never test, nor the training questions


@dataclass(frozen=True)
class Tune:
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    split: str = "validation"
    n_questions: int | None = None


class TuningNotDone(InputError):
    """A test seed's run needs a chosen lr, and some tuning trial has not run yet."""


def parse_tune(data: dict, err, test_seeds: tuple[int, ...]) -> Tune | None:
    """The `tune:` block of a grid study (None when absent)."""
    spec = data.get("tune")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise err("tune", "expected a mapping {lr: [...], seeds: [...], split: validation, n_questions: N}")
    for key in spec:
        if key not in TUNE_KEYS:
            raise err(f"tune.{key}", f"unknown key (known: {', '.join(TUNE_KEYS)})")
    lrs = _lr_list(spec.get("lr"), "tune.lr", err)
    seeds = spec.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise err("tune.seeds", f"expected a non-empty list of ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise err("tune.seeds", f"repeated seeds in {seeds!r}")
    if set(seeds) & set(test_seeds):
        raise err(
            "tune.seeds",
            f"tuning seeds {sorted(set(seeds) & set(test_seeds))} are also test seeds: the settings must be chosen on "
            "models the test never sees",
        )
    split = spec.get("split", "validation")
    if split not in SPLITS:
        raise err("tune.split", f"expected one of {', '.join(SPLITS)} (never test), got {split!r}")
    n_q = spec.get("n_questions")
    if n_q is not None and (not isinstance(n_q, int) or isinstance(n_q, bool) or n_q < 1):
        raise err("tune.n_questions", f"expected an int >= 1, got {n_q!r}")
    return Tune(lrs, tuple(seeds), split, n_q)


def _lr_list(v, key: str, err) -> tuple[float, ...]:
    ok = (
        isinstance(v, list)
        and v
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v)
    )
    if not ok or len(set(v)) != len(v):
        raise err(key, f"expected a non-empty list of distinct learning rates > 0, got {v!r}")
    return tuple(sorted(float(x) for x in v))


def default_lr(plan, protocol: str) -> float:
    """The lr a protocol trains at without tuning: a tuned run at this lr shares the untuned run's folder."""
    return plan.align_lr if protocol == "continue" else plan.vft_lr


def eval_name(tune: Tune) -> str:
    return f"eval.{tune.split}.json"


def choose_lr(scores: dict[float, list[float]]) -> float:
    """The lr with the highest mean score over the tuning seeds; ties go to the smaller lr."""
    if not scores:
        raise ValueError("no trials to choose from")
    return max(sorted(scores), key=lambda lr: (sum(scores[lr]) / len(scores[lr]), -lr))


def selection(root: Path, tune: Tune, kind: str, name: str) -> dict:
    """A method's trials (per lr: the tuning seeds' scores on the split and their training seconds) and its chosen
    lr; `edge` when the choice is the smallest or largest lr tried (the grid may not bracket the best one).
    Raises TuningNotDone when a trial has no score yet."""
    lrs = tune.lrs
    trials, scores, missing = [], {}, []
    for lr in lrs:
        accs, secs = [], []
        for s in tune.seeds:
            d = trial_dir(root, s, kind, name, lr)
            ev = d / eval_name(tune)
            if not ev.exists():
                missing.append(str(ev))
                continue
            accs.append(float(json.loads(ev.read_text())["accuracy"]))
            secs.append(_train_seconds(d))
        scores[lr] = accs
        trials.append({"lr": lr, "scores": accs, "train_seconds": secs})
    if missing:
        raise TuningNotDone(
            f"tuning of {name} is not finished ({len(missing)} trial(s) to go, e.g. {missing[0]}): run the tuning "
            f"seeds first (--seeds {','.join(map(str, tune.seeds))}), or the study without --seeds",
            field="tune",
        )
    chosen = choose_lr(scores)
    return {
        "name": name,
        "kind": kind,
        "split": tune.split,
        "n_questions": tune.n_questions,
        "seeds": list(tune.seeds),
        "trials": trials,
        "chosen_lr": chosen,
        "edge": len(lrs) > 1 and chosen in (min(lrs), max(lrs)),
    }


def _train_seconds(d: Path) -> float | None:
    """A trial's training seconds from its command's metrics.json (an align / grpo run, or the rounds of iterate)."""
    for m in (d / METRICS, arm_run_dir(d) / METRICS):
        if m.exists():
            data = json.loads(m.read_text())
            if "rounds" in data:
                return sum(
                    float(r.get("compute", {}).get("train", {}).get("train_seconds", 0.0)) for r in data["rounds"]
                )
            c = data.get("compute") or {}
            return float(c["train_seconds"]) if "train_seconds" in c else None
    return None


def tuning_rows(selections: list[dict]) -> list[dict]:
    """One markdown row per method and trial lr: the tuning seeds' scores, their training minutes, the choice."""
    rows = []
    for sel in selections:
        for t in sel["trials"]:
            mean = sum(t["scores"]) / len(t["scores"]) if t["scores"] else None
            secs = [x for x in t["train_seconds"] if x is not None]
            rows.append(
                {
                    "method": sel["name"],
                    "lr": f"{t['lr']:g}",
                    f"{sel['split']} acc %": None if mean is None else f"{100 * mean:.1f}",
                    "train min": f"{sum(secs) / 60:.1f}" if secs else None,
                    "chosen": ("**yes**" + (" (edge of the grid)" if sel["edge"] else ""))
                    if t["lr"] == sel["chosen_lr"]
                    else "",
                }
            )
    return rows
