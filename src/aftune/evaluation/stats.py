"""Paired statistics for comparing two methods on the same questions over several training seeds.

The design of a study: S seeds (each a separately trained pair of models: method and control) answer the same Q
test questions. The seeds are *not* S x Q independent observations: a question that separates the two methods in
one seed tends to separate them in the others, and every seed answers the same questions. So the unit of the
pooled test is the question (`paired_test`), and each seed's own exact McNemar test and the spread of the
per-seed differences are reported next to it (three trained models are a small sample of training runs).
"""

from __future__ import annotations

import math
import statistics

import numpy as np


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs b (only A right) and c (only B right) are
    Binomial(b + c, 1/2) under H0; p = min(1, 2 * P(X <= min(b, c)))."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


def paired_test(pairs: list[tuple[dict[str, bool], dict[str, bool]]], seeds: list | None = None) -> dict:
    """Method vs control, one (method {question id: correct}, control {id: correct}) per seed, on the same questions.

    Per question q and seed s, d_qs = method_qs - control_qs in {-1, 0, 1}; per question the mean over seeds
    dbar_q = (1/S) sum_s d_qs. The questions are the independent units; the seeds are repeated measures of each:

    * diff = (1/Q) sum_q dbar_q (= the mean over seeds of the accuracy differences).
    * se_question = sd(dbar) / sqrt(Q), sd the sample standard deviation over the Q questions;
      ci95 = diff -/+ t_{0.975, Q-1} * se_question (Student t interval over questions). It accounts for which
      questions the test set holds, and for the correlation of a question's outcomes across seeds; it treats the
      S trained models as fixed.
    * p_question: exact two-sided sign-flip (randomisation) test over questions. Under H0 the method and control
      labels of a question are exchangeable (swapping them in every seed of that question at once leaves the law
      unchanged), so T = sum_q m_q with m_q = sum_s d_qs is distributed as sum_q eps_q |m_q|, eps_q = +-1 fair and
      independent; p = P(|sum_q eps_q |m_q|| >= |T|), computed exactly (`sign_flip_p`). One seed: it is the exact
      McNemar test. Chosen over the t-test's p because with few discordant questions the t-test is
      anti-conservative (one seed, b = 5, c = 0: t gives p = 0.025, the exact test 0.0625), and over a bootstrap
      because it is exact and deterministic.
    * per_seed: each seed's difference, discordant counts b (method only right) and c, and exact McNemar p;
      seed_sd: the standard deviation of the per-seed differences (the spread across training runs, which the
      interval above does not include).

    Copies of one seed give exactly that seed's diff, se_question, ci95 and p_question: they add no questions.
    """
    if not pairs:
        raise ValueError("no (method, control) pairs to compare")
    seeds = list(range(len(pairs))) if seeds is None else list(seeds)
    if len(seeds) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {len(seeds)} seed labels")
    questions = sorted(pairs[0][0])
    per_seed = []
    m = np.zeros(len(questions), dtype=np.int64)  # per question: sum over seeds of d_qs
    for s, (method, control) in zip(seeds, pairs):
        if set(method) != set(control) or set(method) != set(questions):
            raise ValueError("method and control (every seed) must be evaluated on the same questions")
        d = np.array([int(method[q]) - int(control[q]) for q in questions], dtype=np.int64)
        m += d
        b, c = int((d > 0).sum()), int((d < 0).sum())
        per_seed.append(
            {"seed": s, "diff": float(d.mean()) if len(d) else None, "b": b, "c": c, "p_mcnemar": mcnemar_exact(b, c)}
        )
    n_q, n_s = len(questions), len(pairs)
    dbar = m / n_s
    diff = float(dbar.mean()) if n_q else None
    se = float(dbar.std(ddof=1) / math.sqrt(n_q)) if n_q > 1 else None
    half = t_quantile(0.975, n_q - 1) * se if se is not None else None
    diffs = [p["diff"] for p in per_seed]
    return {
        "unit": "question",
        "n_questions": n_q,
        "n_seeds": n_s,
        "diff": diff,
        "se_question": se,
        "ci95": None if half is None else [diff - half, diff + half],
        "p_question": sign_flip_p(m) if n_q else 1.0,
        "per_seed": per_seed,
        "diff_per_seed": diffs,
        "seed_sd": statistics.stdev(diffs) if n_s > 1 else None,
    }


def sign_flip_p(m) -> float:
    """Exact two-sided p of the sign-flip test on integer per-question statistics m_q:
    P(|sum_q eps_q |m_q|| >= |sum_q m_q|) with eps_q independent fair signs.

    The null distribution is the convolution, over each magnitude v > 0 held by n_v questions, of
    v * (2 * Binomial(n_v, 1/2) - n_v): exact up to floating point (binomial terms from log-gamma)."""
    m = np.asarray(m, dtype=np.int64)
    t_obs = abs(int(m.sum()))
    mags, counts = np.unique(np.abs(m[m != 0]), return_counts=True)
    if t_obs == 0:
        return 1.0
    dist = np.ones(1)  # P(sum = i - offset), offset = sum of the magnitudes convolved so far
    for v, n in zip(mags.tolist(), counts.tolist()):
        j = np.arange(n + 1)
        log_pmf = (
            math.lgamma(n + 1)
            - np.array([math.lgamma(x + 1) + math.lgamma(n - x + 1) for x in j.tolist()])
            - n * math.log(2)
        )
        term = np.zeros(2 * v * n + 1)
        term[2 * v * j] = np.exp(log_pmf)  # values v * (2j - n), on a grid from -v n with step 1
        dist = np.convolve(dist, term)
    offset = (len(dist) - 1) // 2
    values = np.arange(len(dist)) - offset
    return float(min(1.0, dist[np.abs(values) >= t_obs].sum()))


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with df degrees of freedom, by bisection on its CDF."""
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def t_cdf(t: float, df: int) -> float:
    """P(T <= t), T ~ Student t(df): 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2), for t >= 0."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz; Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side; use the symmetry otherwise
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for i in range(1, 500):
        for num in (
            i * (b - i) * x / ((a + 2 * i - 1) * (a + 2 * i)),
            -(a + i) * (a + b + i) * x / ((a + 2 * i) * (a + 2 * i + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a


def summary(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
        "values": values,
    }
