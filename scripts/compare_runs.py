"""Paired test of two runs of an `aftune experiment` pooled over seeds (the cells its table does not pair).

    python scripts/compare_runs.py runs/experiments/testbed-v2 runs/dc-k8-l1 runs/align-k8-l1 --seeds 0,1,2

Each argument after the experiment's `out` is a run folder relative to `seed<S>/` (`runs/<cell>` continues from
VFT, `runs-from-base/<cell>` trains from the base, `eval/VFT` is the VFT start). Prints A - B in accuracy points
± its standard error, the discordant counts and the exact McNemar p (the test of the experiment's table).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aftune.commands.experiment.results import paired_evals


def eval_json(root: Path, seed: int, run: str) -> Path:
    p = root / f"seed{seed}" / run
    return p.with_suffix(".json") if run.startswith("eval/") else p / "eval.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the experiment's out folder")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    a, b = ({s: eval_json(args.out, s, run) for s in seeds} for run in (args.a, args.b))
    t = paired_evals(a, b, seeds)
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in t["diff_per_seed"])
    print(
        f"{args.a} - {args.b}: {100 * t['diff']:+.1f} ± {100 * t['se']:.1f} pts over {t['n']} questions "
        f"(seeds: {per_seed}); b / c {t['b']} / {t['c']}; McNemar p = {t['p']:.2g}"
    )


if __name__ == "__main__":
    main()
