"""An arms study's results: per arm its test accuracy over seeds, the paired test against the `control` arm, and
what it spent (generated tokens, tokens scored in training, optimiser steps, wall seconds), read from the files
the commands wrote; results.json, results-online.md and plots of accuracy against compute.

Compute of an arm, per seed (every count is the command's own, exact under kill-and-resume):

* align: the training run's `compute` block (tokens scored, optimiser steps, semi-online resampling's generated
  tokens and seconds), plus, when its method trains on the sampled candidates (every method but `vft`), the shared
  sampling pass it trains on: its sidecar's `generated_tokens` and `wall_s`. That pass is made once per seed for
  every study in `out`, but each arm that reads it is charged it in full: it is what that arm needed.
* iterate: the sum over rounds of its metrics.json (round 1 on `candidates: shared` is charged that pass, through
  its sidecar, as iterate itself does).
* grpo: its `compute` block; TRL generates inside the training steps, so its train seconds include sampling.

Wall seconds = sampling seconds (the sampler's own `wall_s`) + training seconds (`train_seconds` of the compute
block: the optimiser steps kept, resampling included); model loading and evaluations are left out, for every arm
alike. As in the commands, seconds are those of the process that completed a stage.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from aftune.commands.experiment.layout import (
    CONTROL_ARM,
    EVAL,
    METRICS,
    Arm,
    ArmsStudy,
    arm_dir,
    arm_run_dir,
    sampled_candidates,
    vft_eval,
)
from aftune.commands.experiment.plots import plot_compute, plot_experiment
from aftune.commands.experiment.results import (
    PAIRED_TEST,
    STATS_LEGEND,
    delta_text,
    mean_std_text,
    p_text,
    paired_evals,
    seeds_text,
)
from aftune.evaluation.report import markdown_image, markdown_table, write_report
from aftune.evaluation.stats import summary
from aftune.io import atomic_write_json
from aftune.records import CandidatesMeta, meta_path_for
from aftune.training.methods import METHODS

COMPUTE_KEYS = (
    "generated_tokens",
    "tokens_scored",
    "optimizer_steps",
    "sample_seconds",
    "train_seconds",
    "wall_seconds",
)


def sampling_stats(candidates: Path) -> dict:
    """The `stats` a candidates file's sidecar records (generated_tokens, wall_s, questions, ...); {} if none."""
    meta = meta_path_for(candidates)
    return dict(CandidatesMeta.read(meta).stats or {}) if meta.exists() else {}


def trains_on_candidates(method: str) -> bool:
    """Whether an align method reads the sampled candidates (its loss, or RFT's NLL data): the control does not."""
    m = METHODS[method]
    return m.loss is not None or m.nll_data == "rft"


def arm_compute(command: str, metrics: dict, sampling: dict | None) -> dict:
    """One seed's compute of an arm from its command's metrics.json (`sampling`: the shared pass's sidecar stats
    when the arm trains on it, else None), with its accuracy-vs-compute points: one per iterate round, else one
    (its accuracy is the study's eval, filled in by the caller)."""
    if command == "iterate":
        gen = scored = steps = 0
        sample_s = train_s = 0.0
        points = []
        for r in metrics["rounds"][1:]:  # round 0 is the start model
            c = r["compute"]
            gen += int(c["generated_tokens"])
            scored += int(c["tokens_scored"])
            steps += int(c["optimizer_steps"])
            sample_s += float(c.get("sample", {}).get("wall_s", 0.0))
            train_s += float(c.get("train", {}).get("train_seconds", 0.0))
            points.append(
                {
                    "round": r["round"],
                    "generated_tokens": gen,
                    "wall_seconds": sample_s + train_s,
                    "test_acc": r["accuracy"],
                }
            )
        return _totals(gen, scored, steps, sample_s, train_s, points)
    train = metrics.get("compute") or {}
    gen = int(train.get("generated_tokens", 0))
    sample_s = None if command == "grpo" else 0.0  # grpo: no separate sampling stage
    if sampling is not None:
        gen += int(sampling.get("generated_tokens", 0))
        sample_s = float(sampling.get("wall_s", 0.0))
    train_s = float(train.get("train_seconds", 0.0))
    wall = (sample_s or 0.0) + train_s
    point = {"round": None, "generated_tokens": gen, "wall_seconds": wall, "test_acc": None}
    return _totals(
        gen, int(train.get("tokens_scored", 0)), int(train.get("optimizer_steps", 0)), sample_s, train_s, [point]
    )


def _totals(gen: int, scored: int, steps: int, sample_s: float | None, train_s: float, points: list) -> dict:
    return {
        "generated_tokens": gen,
        "tokens_scored": scored,
        "optimizer_steps": steps,
        "sample_seconds": None if sample_s is None else round(sample_s, 3),
        "train_seconds": round(train_s, 3),
        "wall_seconds": round((sample_s or 0.0) + train_s, 3),
        "points": points,
    }


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def arm_entry(root: Path, study: ArmsStudy, arm: Arm, control_evals: dict[int, Path]) -> dict:
    """One arm over the study's seeds: accuracy, the paired test against the control, mean compute, curve."""
    seeds = list(study.seeds)
    per_seed = {s: arm_seed(root, study, arm, s) for s in seeds}
    evals = {s: arm_dir(root, s, arm.name) / EVAL for s in seeds}
    return {
        "arm": arm.name,
        "command": arm.command,
        "method": per_seed[seeds[-1]]["method"],
        "settings": arm.spec,
        "seeds": seeds,
        "test_acc": summary([per_seed[s]["test_acc"] for s in seeds]),
        "vs_control": paired_evals(evals, control_evals, seeds),
        "compute": {k: _mean([per_seed[s][k] for s in seeds]) for k in COMPUTE_KEYS},
        "per_seed": {str(s): {k: v for k, v in per_seed[s].items() if k not in ("points", "method")} for s in seeds},
        "curve": _curve([per_seed[s]["points"] for s in seeds]),
    }


def arm_seed(root: Path, study: ArmsStudy, arm: Arm, seed: int) -> dict:
    """One seed of an arm: its method, test accuracy and compute (`arm_compute`), from the files it wrote."""
    d = arm_dir(root, seed, arm.name)
    metrics = json.loads((arm_run_dir(d) / METRICS).read_text())
    method = str(metrics.get("method"))
    charged = arm.command == "align" and trains_on_candidates(method)
    shared = sampling_stats(sampled_candidates(root, seed, study.kmax)) if charged else None
    comp = arm_compute(arm.command, metrics, shared)
    acc = json.loads((d / EVAL).read_text())["accuracy"]
    if comp["points"][-1]["test_acc"] is None:
        comp["points"][-1]["test_acc"] = acc
    return {"method": method, "test_acc": acc, **comp}


def _curve(points: list[list[dict]]) -> list[dict]:
    """The mean over seeds of each accuracy-vs-compute point (`points`: one list per seed, the same rounds)."""
    return [
        {
            "round": points[0][i]["round"],
            "generated_tokens": _mean([p[i]["generated_tokens"] for p in points]),
            "wall_seconds": _mean([p[i]["wall_seconds"] for p in points]),
            "test_acc": summary([p[i]["test_acc"] for p in points]),
        }
        for i in range(len(points[0]))
    ]


def write_arms_results(root: Path, report: Path, study: ArmsStudy) -> dict:
    """report/results.json, results-online.md and plots/ from the files under root (rerunnable)."""
    control = {s: arm_dir(root, s, CONTROL_ARM) / EVAL for s in study.seeds}
    results = {
        "kind": "arms",
        "name": study.name,
        "plan": dataclasses.asdict(study.plan),
        "seeds": list(study.seeds),
        "data_seed": study.data_seed,
        "sample_k": study.kmax,
        "control": CONTROL_ARM,
        "paired_test": PAIRED_TEST,
        "shared_sampling": shared_sampling(root, study),
        "vft": vft_entry(root, study, control),
        "arms": [arm_entry(root, study, arm, control) for arm in study.arms],
    }
    atomic_write_json(report / "results.json", results)
    plots = plot_compute(report, results["arms"], results["vft"], study.name)
    plots += plot_experiment(report, _plot_cells(results), study.name, CONTROL_ARM)
    write_report(
        report / "results-online.md",
        f"aftune experiment: {study.name} (arms)",
        _sections(study, results, plots, report),
    )
    return results


def vft_entry(root: Path, study: ArmsStudy, control_evals: dict[int, Path]) -> dict:
    """The VFT start every arm begins from: its accuracy over seeds and the paired test against the control."""
    evals = {s: vft_eval(root, s) for s in study.seeds}
    return {
        "test_acc": summary([json.loads(evals[s].read_text())["accuracy"] for s in study.seeds]),
        "vs_control": paired_evals(evals, control_evals, study.seeds),
    }


SAMPLING_STATS = ("questions", "candidates", "frac_correct", "frac_mixed", "generated_tokens", "wall_s")


def shared_sampling(root: Path, study: ArmsStudy) -> dict:
    """Per seed, the shared sampling pass's size and cost (its sidecar's stats)."""
    return {
        f"seed{s}": {
            k: v for k, v in sampling_stats(sampled_candidates(root, s, study.kmax)).items() if k in SAMPLING_STATS
        }
        for s in study.seeds
    }


def _plot_cells(results: dict) -> list[dict]:
    """plot_experiment's view: the per-arm bars and the paired differences to the control."""
    return [
        {
            "cell": "VFT",
            "method": "VFT (start)",
            "k": None,
            "beta": None,
            "lambda": None,
            **_cell_metrics(results["vft"]),
        },
        *(
            {"cell": a["arm"], "method": a["method"], "k": None, "beta": None, "lambda": None, **_cell_metrics(a)}
            for a in results["arms"]
        ),
    ]


def _cell_metrics(entry: dict) -> dict:
    return {"metrics": {"test_acc": entry["test_acc"]}, "vs_control": entry["vs_control"]}


def _per_seed_text(m: dict) -> str:
    return ", ".join("–" if v is None else f"{100 * v:.1f}" for v in m["values"])


def _sections(study: ArmsStudy, results: dict, plots: list[tuple[Path, str]], report: Path) -> list[tuple[str, str]]:
    """results-online.md's sections, in order (the per-round and sampling tables only when they have rows)."""
    sections = [("Results", _results_table(study, results))]
    curve = _curve_table(results["arms"])
    if curve:
        sections.append(("Iterate arms per round", curve))
    sampling = _sampling_table(results["shared_sampling"])
    if sampling:
        sections.append(("Shared sampling pass (per seed)", sampling))
    sections.append(("Plots", "\n\n".join(markdown_image(p, alt, report) for p, alt in plots) or "None."))
    sections.append(
        ("Arms", "```\n" + json.dumps({a["arm"]: a["settings"] for a in results["arms"]}, indent=1) + "\n```")
    )
    sections.append(("Plan", "```\n" + json.dumps(results["plan"], indent=1) + "\n```"))
    return sections


def _arm_row(name: str, command: str | None, method: str | None, acc: dict, t: dict, comp: dict | None) -> dict:
    comp = comp or {}
    wall = comp.get("wall_seconds")
    return {
        "arm": name,
        "command": command,
        "method": method,
        "test acc %": mean_std_text(acc, 100),
        "per seed %": _per_seed_text(acc),
        "Δ vs control, pts [95% CI]": delta_text(t),
        "p": p_text(t),
        "Δ per seed (McNemar p); sd": seeds_text(t),
        "generated tokens": comp.get("generated_tokens"),
        "tokens scored": comp.get("tokens_scored"),
        "optimiser steps": comp.get("optimizer_steps"),
        "wall min": None if wall is None else wall / 60,
    }


def _results_table(study: ArmsStudy, results: dict) -> str:
    """The VFT start and every arm: accuracy, the paired test against the control, mean compute; and the legend."""
    rows = [_arm_row("VFT (start)", None, None, results["vft"]["test_acc"], results["vft"]["vs_control"], None)]
    rows += [
        _arm_row(a["arm"], a["command"], a["method"], a["test_acc"], a["vs_control"], a["compute"])
        for a in results["arms"]
    ]
    fmt = {"generated tokens": ",.0f", "tokens scored": ",.0f", "optimiser steps": ",.0f", "wall min": ".1f"}
    table = markdown_table(rows, list(rows[0]), fmt)
    notes = f"""
Mean ± std over {len(study.seeds)} VFT seed(s) {list(study.seeds)} (data seed {study.data_seed}: every seed sees
the same {study.plan.n_test} test questions). **test acc**: greedy accuracy of the arm's final model. **Δ vs
control**: against the `{results["control"]}` arm of the same seed (the control against itself: 0, p = 1).
{STATS_LEGEND}
Compute columns are means over
seeds: **generated tokens**: every token sampled for the arm (an align arm whose method reads the candidates is
charged the shared k={study.kmax} sampling pass; iterate: every round's pass; semi-online: + its resampling; grpo:
its rollouts); **tokens scored**: tokens forwarded in training; **wall min**: sampling + training seconds (no model
loading, no evaluation). See docs/online.md."""
    return table + notes


def _curve_table(arms: list[dict]) -> str | None:
    """The iterate arms' accuracy and cumulative compute after each round (None: no iterate arm)."""
    rows = [
        {
            "arm": a["arm"],
            "round": p["round"],
            "test acc %": mean_std_text(p["test_acc"], 100),
            "cum. generated tokens": p["generated_tokens"],
            "cum. wall min": None if p["wall_seconds"] is None else p["wall_seconds"] / 60,
        }
        for a in arms
        if a["command"] == "iterate"
        for p in a["curve"]
    ]
    if not rows:
        return None
    return markdown_table(rows, list(rows[0]), {"cum. generated tokens": ",.0f", "cum. wall min": ".1f"})


def _sampling_table(shared: dict) -> str | None:
    """The shared pass per seed, with the stats its sidecars recorded (None: no seed)."""
    rows = [{"seed": s, **v} for s, v in shared.items()]
    if not rows:
        return None
    cols = ["seed", *[k for k in SAMPLING_TABLE if any(k in r for r in rows)]]
    fmt = {"generated_tokens": ",.0f", "wall_s": ".1f", "frac_correct": ".1%", "frac_mixed": ".1%"}
    return markdown_table(rows, cols, fmt)


SAMPLING_TABLE = ("questions", "candidates", "generated_tokens", "wall_s", "frac_correct", "frac_mixed")
