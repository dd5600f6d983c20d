"""evaluation.stats: the question-level paired test over seeds (copies add nothing, the interval covers at its
nominal rate when a question's outcomes are correlated across seeds), the exact tests it builds on."""

import math
import random

import numpy as np
import pytest

from aftune.evaluation.stats import mcnemar_exact, paired_test, sign_flip_p, t_quantile


def _seed(rng: random.Random, n: int) -> tuple[dict[str, bool], dict[str, bool]]:
    return (
        {f"q{i}": rng.random() < 0.3 for i in range(n)},
        {f"q{i}": rng.random() < 0.25 for i in range(n)},
    )


def test_exact_tests_and_t_quantiles_by_hand():
    # b=1, c=5: P(X<=1 | n=6) = (1 + 6) / 64, two-sided 14/64
    assert mcnemar_exact(1, 5) == pytest.approx(14 / 64) == mcnemar_exact(5, 1)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    # one seed's sign-flip test is the exact McNemar test (d in {-1, 0, 1}), whatever the concordant questions
    for b, c in ((5, 0), (1, 5), (20, 8), (156, 133)):
        m = [1] * b + [-1] * c + [0] * 50
        assert sign_flip_p(m) == pytest.approx(mcnemar_exact(b, c), rel=1e-9)
    # mixed magnitudes, by enumeration: |m| = (2, 1, 1), T = 2 + 1 - 1 = 2; of the 8 sign patterns the sums are
    # +-4, +-2, +-2, +-0 -> P(|S| >= 2) = 6/8
    assert sign_flip_p([2, 1, -1]) == pytest.approx(6 / 8)
    assert sign_flip_p([0, 0]) == 1.0
    # Student t quantiles (tables): df 1, 2, 10, 999
    for df, q in ((1, 12.706205), (2, 4.302653), (10, 2.228139), (999, 1.962341)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-5)


def test_paired_test_by_hand():
    # seed 0: q1 method only, q2 control only, q3 both, q4 neither; seed 1: q1, q2 method only
    m0, c0 = {"q1": True, "q2": False, "q3": True, "q4": False}, {"q1": False, "q2": True, "q3": True, "q4": False}
    m1, c1 = {"q1": True, "q2": True, "q3": False, "q4": False}, {"q1": False, "q2": False, "q3": False, "q4": False}
    t = paired_test([(m0, c0), (m1, c1)], seeds=[0, 7])
    # per question summed over seeds m = (2, 0, 0, 0), mean over seeds dbar = (1, 0, 0, 0): diff 1/4,
    # sd(dbar) = sqrt((1 - 4/16) / 3) = 1/2, SE = 1/2 / 2 = 1/4, CI 1/4 -+ t(0.975, 3) / 4
    assert t["diff"] == pytest.approx(0.25) and t["se_question"] == pytest.approx(0.25)
    assert t["ci95"] == pytest.approx([0.25 - 3.182446 / 4, 0.25 + 3.182446 / 4], abs=1e-5)
    assert t["p_question"] == pytest.approx(1.0)  # one discordant question: +-2 either way
    assert (t["n_questions"], t["n_seeds"]) == (4, 2)
    assert [(s["seed"], s["diff"], s["b"], s["c"]) for s in t["per_seed"]] == [(0, 0.0, 1, 1), (7, 0.5, 2, 0)]
    assert [s["p_mcnemar"] for s in t["per_seed"]] == [1.0, pytest.approx(0.5)]
    assert t["diff_per_seed"] == [0.0, 0.5] and t["seed_sd"] == pytest.approx(math.sqrt(0.125))
    # the pooled pairs' numbers are gone: nothing to read an SE of sd(d) / sqrt(S Q) from
    assert not {"b", "c", "n", "se", "p"} & set(t)
    with pytest.raises(ValueError, match="same questions"):
        paired_test([({"q1": True}, {"q2": True})])
    with pytest.raises(ValueError, match="same questions"):
        paired_test([({"q1": True}, {"q1": True}), ({"q2": True}, {"q2": True})])


def test_copies_of_one_seed_add_no_information():
    """Three identical copies of one seed: the same difference, SE, interval and p as that seed alone (the pooled
    test of 3 x Q pairs reported an SE sqrt(3) smaller and a far smaller p)."""
    one = _seed(random.Random(0), 1000)
    alone, copies = paired_test([one]), paired_test([one] * 3)
    for key in ("diff", "se_question", "p_question"):
        assert copies[key] == pytest.approx(alone[key], rel=1e-9)
    assert copies["ci95"] == pytest.approx(alone["ci95"], rel=1e-9)
    assert alone["p_question"] == pytest.approx(alone["per_seed"][0]["p_mcnemar"], rel=1e-9)
    assert copies["seed_sd"] == 0.0 and copies["n_questions"] == 1000 and copies["n_seeds"] == 3
    # and a seed that is not a copy does change them
    other = paired_test([one, one, _seed(random.Random(1), 1000)])
    assert other["se_question"] != pytest.approx(alone["se_question"], rel=1e-6)


# Question types (weight, P(control right), P(method right)): a question's outcomes are independent across seeds
# given its type, so questions that separate the methods do so in every seed. True difference:
# 0.15 * 0.85 - 0.15 * 0.8 = 0.0075.
TYPES = [(0.5, 0.1, 0.1), (0.2, 0.9, 0.9), (0.15, 0.05, 0.9), (0.15, 0.9, 0.1)]
TRUE_DIFF = sum(w * (pm - pc) for w, pc, pm in TYPES)


def test_interval_has_nominal_coverage_when_seeds_are_correlated():
    """1,000 simulated studies (200 questions x 3 seeds): the 95% question-level interval covers the true
    difference in 93-97% of them; the old pooled interval (SE = sd(d) / sqrt(3 x 200)) covers far less."""
    rng = np.random.default_rng(2024)
    n_studies, n_q, n_s = 1000, 200, 3
    w = np.array([t[0] for t in TYPES])
    pc, pm = np.array([t[1] for t in TYPES]), np.array([t[2] for t in TYPES])
    ids = [f"q{i}" for i in range(n_q)]
    covered = covered_pooled = 0
    for _ in range(n_studies):
        kind = rng.choice(len(TYPES), size=n_q, p=w)
        ctl = rng.random((n_s, n_q)) < pc[kind]
        met = rng.random((n_s, n_q)) < pm[kind]
        pairs = [(dict(zip(ids, met[s].tolist())), dict(zip(ids, ctl[s].tolist()))) for s in range(n_s)]
        t = paired_test(pairs)
        lo, hi = t["ci95"]
        covered += lo <= TRUE_DIFF <= hi
        d = (met.astype(int) - ctl.astype(int)).ravel()
        half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
        covered_pooled += abs(d.mean() - TRUE_DIFF) <= half
    assert 0.93 <= covered / n_studies <= 0.97, covered / n_studies
    assert covered_pooled / n_studies < 0.85, covered_pooled / n_studies
