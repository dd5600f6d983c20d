"""Paired statistics for comparing methods on the same questions: exact McNemar and the mean difference."""

from __future__ import annotations

import math
import statistics


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs b (only A right) and c (only B right) are
    Binomial(b + c, 1/2) under H0; p = min(1, 2 * P(X <= min(b, c)))."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


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
    se = math.sqrt(((b + c) - n * mean**2) / (n - 1) / n) if n > 1 else None
    return {"b": b, "c": c, "n": n, "diff": mean, "se": se, "p": mcnemar_exact(b, c), "diff_per_seed": per_seed}


def summary(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
        "values": values,
    }
