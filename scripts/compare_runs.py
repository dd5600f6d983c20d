"""Paired comparison of two runs of an `aftune experiment` over seeds (the cells its table does not pair).

    python scripts/compare_runs.py runs/experiments/testbed-v2 runs/dc-k8-l1 runs/align-k8-l1 --seeds 0,1,2

Each argument after the experiment's `out` is a run folder relative to `seed<S>/` (`runs/<cell>` continues from
VFT, `runs-from-base/<cell>` trains from the base, `online/<arm>` is an arms study's arm, `eval/VFT` is the VFT
start). Prints A - B in accuracy points with its question-level 95% interval and p (the question is the unit:
`evaluation.stats.paired_test`, the test of the experiment's tables), each seed's difference with its own exact
McNemar p, and the standard deviation of the per-seed differences. `--json` prints the whole test as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aftune.commands.experiment.results import delta_text, paired_evals, seeds_text


def eval_json(root: Path, seed: int, run: str) -> Path:
    p = root / f"seed{seed}" / run
    return p.with_suffix(".json") if run.startswith("eval/") else p / "eval.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the experiment's out folder")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", action="store_true", help="print the test's JSON instead of the line")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    a, b = ({s: eval_json(args.out, s, run) for s in seeds} for run in (args.a, args.b))
    t = paired_evals(a, b, seeds)
    if args.json:
        print(json.dumps(t, indent=1))
        return
    print(
        f"{args.a} - {args.b}: {delta_text(t)} pts over {t['n_questions']} questions x {t['n_seeds']} seeds, "
        f"p = {t['p_question']:.2g} (question-level); per seed: {seeds_text(t)}"
    )


if __name__ == "__main__":
    main()
