"""Assessment metrics on hand-made candidate sets whose answers are worked out by hand below."""

from __future__ import annotations

import json
import math

import pytest

from aftune.evaluation.assessment import acc_vs_k, assessment_metrics, displacement_alarm, per_question
from aftune.records import Candidate, Group


def cand(answer: str | None, correct: bool, score: float | None, is_reference: bool = False) -> Candidate:
    return Candidate(
        text=f"... the answer is {answer}", answer=answer, correct=correct, score=score, is_reference=is_reference
    )


def group(gid: str, gold: str, cands: list[Candidate]) -> Group:
    return Group(id=gid, task="toy", prompt="Q?", reference="ref", answer=gold, candidates=cands)


def toy_groups() -> list[Group]:
    return [
        # A: mixed. pairs (p, n): -0.5 beats -0.9, ties -0.5, loses to -0.2 -> 1.5; -0.8 beats -0.9 -> 1.
        #    2.5 / 6. Top pick is the negative at -0.2. Majority: "5" and "3" tie 2-2, summed score
        #    -1.1 ("3") > -1.3 ("5") -> "3" (wrong). Weighted: e^-.2+e^-.9=1.225 > e^-.5+e^-.8=1.056 -> "3".
        group(
            "A",
            "5",
            [
                cand("5", True, -0.5),
                cand("3", False, -0.2),
                cand("5", True, -0.8),
                cand("3", False, -0.9),
                cand(None, False, -0.5),
            ],
        ),
        # B: mixed, 2/2 pairs won; self-select and weighted vote right ("7": e^-.1=.905 > "8": .669),
        #    majority wrong ("8" has two votes).
        group("B", "7", [cand("7", True, -0.1), cand("8", False, -1.0), cand("8", False, -1.2)]),
        # C: only positives; D: a single negative; neither enters assessment accuracy.
        group("C", "2", [cand("2", True, -0.3), cand("2", True, -0.4)]),
        group("D", "0", [cand("1", False, -0.3)]),
        # E: the reference plus one negative: mixed only when the reference is included.
        group("E", "9", [cand("9", True, -0.05, is_reference=True), cand("4", False, -0.6)]),
    ]


def test_assessment_accuracy_macro_micro_and_counts():
    m = assessment_metrics(toy_groups())
    assert m["n_questions"] == 5
    assert m["n_questions_mixed"] == 2
    assert m["n_pairs"] == 8
    assert m["assessment_acc_macro"] == pytest.approx((2.5 / 6 + 1.0) / 2)
    assert m["assessment_acc_micro"] == pytest.approx(4.5 / 8)
    assert m["frac_negative_outranks_all_positives"] == pytest.approx(0.5)
    assert m["n_questions_only_positive"] == 1  # C
    assert m["n_questions_only_negative"] == 2  # D, and E without its reference
    assert m["n_candidates"] == 12  # 5+3+2+1+1: the reference is not a sampled candidate


def test_include_reference_makes_reference_a_positive():
    m = assessment_metrics(toy_groups(), include_reference=True)
    assert m["n_questions_mixed"] == 3
    assert m["n_pairs"] == 9
    assert m["assessment_acc_macro"] == pytest.approx((2.5 / 6 + 1.0 + 1.0) / 3)
    assert m["assessment_acc_micro"] == pytest.approx(5.5 / 9)
    # selection never picks the gold text: E stays wrong
    assert m["best_of_k_self"] == pytest.approx(0.4)


def test_selection_metrics_over_all_questions():
    m = assessment_metrics(toy_groups())
    # per question (A, B, C, D, E): self F T T F F; weighted F T T F F; majority F F T F F; pass T T T F F
    assert m["n_questions_selection"] == 5
    assert m["best_of_k_self"] == pytest.approx(2 / 5)
    assert m["weighted_vote"] == pytest.approx(2 / 5)
    assert m["majority_vote"] == pytest.approx(1 / 5)
    assert m["pass_at_k"] == pytest.approx(3 / 5)
    assert m["mean_candidate_acc"] == pytest.approx((2 / 5 + 1 / 3 + 1 + 0 + 0) / 5)


def test_likelihood_metrics():
    m = assessment_metrics(toy_groups())
    pos = [-0.5, -0.8, -0.1, -0.3, -0.4]
    neg = [-0.2, -0.9, -0.5, -1.0, -1.2, -0.3, -0.6]
    assert m["mean_score_positive"] == pytest.approx(sum(pos) / 5)
    assert m["mean_score_negative"] == pytest.approx(sum(neg) / 7)
    assert m["ppl_positive"] == pytest.approx(sum(math.exp(-s) for s in pos) / 5)
    assert m["ppl_negative"] == pytest.approx(sum(math.exp(-s) for s in neg) / 7)
    assert m["mean_score_reference"] == pytest.approx(-0.05)
    assert m["ppl_reference"] == pytest.approx(math.exp(0.05))
    # point-biserial r = (M1 - M0) / sd * sqrt(p q), sd the population standard deviation
    allv = pos + neg
    mu = sum(allv) / len(allv)
    sd = math.sqrt(sum((v - mu) ** 2 for v in allv) / len(allv))
    p = len(pos) / len(allv)
    r = (sum(pos) / 5 - sum(neg) / 7) / sd * math.sqrt(p * (1 - p))
    assert m["score_correct_corr"] == pytest.approx(r)


def test_reference_scores_argument_overrides_reference_candidates():
    m = assessment_metrics(toy_groups(), reference_scores=[-0.1, None, -0.3, None, None])
    assert m["mean_score_reference"] == pytest.approx(-0.2)
    assert m["ppl_reference"] == pytest.approx((math.exp(0.1) + math.exp(0.3)) / 2)
    with pytest.raises(ValueError, match="reference_scores"):
        assessment_metrics(toy_groups(), reference_scores=[-0.1])


def test_explicit_scores_replace_candidate_scores():
    g = [group("q", "1", [cand("1", True, -0.1), cand("2", False, -0.9)])]
    assert assessment_metrics(g)["assessment_acc_macro"] == 1.0
    flipped = assessment_metrics(g, scores=[[-0.9, -0.1]])
    assert flipped["assessment_acc_macro"] == 0.0
    assert flipped["best_of_k_self"] == 0.0
    assert flipped["frac_negative_outranks_all_positives"] == 1.0
    assert flipped["score_correct_corr"] == pytest.approx(-1.0)


def test_ties_count_half_and_break_by_order():
    # every pair tied -> 1/2; negative does not strictly outrank; self-select takes the first (wrong) one
    g = [group("t", "1", [cand("2", False, -0.3), cand("1", True, -0.3)])]
    m = assessment_metrics(g)
    assert m["assessment_acc_macro"] == 0.5
    assert m["frac_negative_outranks_all_positives"] == 0.0
    assert m["best_of_k_self"] == 0.0
    # majority: 1 vote each and equal summed score -> first seen ("2", wrong); same for the weighted vote
    assert m["majority_vote"] == 0.0
    assert m["weighted_vote"] == 0.0
    m2 = assessment_metrics(g, scores=[[-0.3, -0.29]])
    assert m2["majority_vote"] == 1.0  # count tie broken by the higher summed score
    assert m2["best_of_k_self"] == 1.0


def test_none_answers_never_win_votes():
    # three unanswered candidates outnumber and outscore the single answered one, yet cannot win
    g = [
        group(
            "n",
            "4",
            [cand(None, False, -0.1), cand(None, False, -0.1), cand(None, False, -0.1), cand("4", True, -2.0)],
        )
    ]
    m = assessment_metrics(g)
    assert m["majority_vote"] == 1.0
    assert m["weighted_vote"] == 1.0
    assert m["best_of_k_self"] == 0.0
    allnone = [group("z", "4", [cand(None, False, -0.1)])]
    rows = per_question(allnone)
    assert rows[0]["majority_vote_answer"] is None and rows[0]["majority_vote_correct"] is False


def test_single_candidate():
    m = assessment_metrics([group("s", "3", [cand("3", True, -0.7)])])
    assert m["assessment_acc_macro"] is None and m["assessment_acc_micro"] is None
    assert m["n_pairs"] == 0
    assert m["best_of_k_self"] == m["weighted_vote"] == m["majority_vote"] == m["pass_at_k"] == 1.0
    assert m["score_correct_corr"] is None  # one point: undefined
    assert m["ppl_positive"] == pytest.approx(math.exp(0.7))
    assert m["ppl_negative"] is None
    assert m["acc_vs_k"] == {
        "k": [1],
        "best_of_k_self": [1.0],
        "weighted_vote": [1.0],
        "majority_vote": [1.0],
        "pass_at_k": [1.0],
    }


def test_empty_input_gives_none_without_crashing():
    for groups in ([], [group("e", "1", [])]):
        m = assessment_metrics(groups)
        json.dumps(m)  # still serialisable
        for key in (
            "assessment_acc_macro",
            "assessment_acc_micro",
            "frac_negative_outranks_all_positives",
            "ppl_positive",
            "ppl_negative",
            "ppl_reference",
            "mean_score_positive",
            "score_correct_corr",
            "best_of_k_self",
            "weighted_vote",
            "majority_vote",
            "pass_at_k",
            "mean_candidate_acc",
        ):
            assert m[key] is None, key
        assert m["n_pairs"] == 0 and m["n_questions_mixed"] == 0
        assert m["acc_vs_k"]["k"] == []
    assert acc_vs_k([], ks=[1, 2]) == {
        "k": [1, 2],
        "best_of_k_self": [None, None],
        "weighted_vote": [None, None],
        "majority_vote": [None, None],
        "pass_at_k": [None, None],
    }


def test_missing_scores_name_the_group():
    g = toy_groups()
    g[2].candidates[1].score = None
    with pytest.raises(ValueError, match=r"group 'C': candidate 1 has no score"):
        assessment_metrics(g)
    # with explicit scores the stored ones are not needed
    scores = [[c.score if c.score is not None else -1.0 for c in x.candidates] for x in g]
    assert assessment_metrics(g, scores=scores)["n_questions"] == 5
    with pytest.raises(ValueError, match=r"group 'B': 2 scores for 3 candidates"):
        assessment_metrics(g, scores=[scores[0], scores[1][:2], *scores[2:]])
    with pytest.raises(ValueError, match="5 groups"):
        assessment_metrics(g, scores=scores[:4])
    with pytest.raises(ValueError, match=r"group 'A'.*non-finite"):
        assessment_metrics(g, scores=[[float("nan")] * 5, *scores[1:]])


def test_per_question_rows():
    rows = per_question(toy_groups())
    assert [r["id"] for r in rows] == ["A", "B", "C", "D", "E"]
    a, b, c, d, e = rows
    assert a["assessment_acc"] == pytest.approx(2.5 / 6) and a["negative_outranks_all_positives"] is True
    assert a["best_of_k_self_answer"] == "3" and a["best_of_k_self_score"] == -0.2
    assert a["majority_vote_answer"] == "3" and a["weighted_vote_answer"] == "3"
    assert b["weighted_vote_answer"] == "7" and b["weighted_vote_correct"] is True
    assert b["majority_vote_answer"] == "8" and b["majority_vote_correct"] is False
    assert c["assessment_acc"] is None and c["mixed"] is False and c["pass_at_k"] is True
    assert d["n_candidates"] == 1 and d["candidate_acc"] == 0.0
    assert e["n_candidates"] == 1 and e["n_positive"] == 0  # the reference is not counted
    empty = per_question([group("x", "1", [cand("1", True, None, is_reference=True)])], scores=[[-0.1]])
    assert empty[0]["best_of_k_self_correct"] is None and empty[0]["candidate_acc"] is None


def test_acc_vs_k_exact_values():
    # n = 4, one correct candidate. It is the top-scored one in "top", the bottom one in "bottom".
    top = group(
        "top", "1", [cand("2", False, -0.5), cand("1", True, -0.1), cand("3", False, -0.6), cand("4", False, -0.7)]
    )
    bottom = group(
        "bottom", "1", [cand("2", False, -0.5), cand("1", True, -0.9), cand("3", False, -0.6), cand("4", False, -0.7)]
    )
    cur = acc_vs_k([top, bottom])
    assert cur["k"] == [1, 2, 4]
    # pass@k = 1 - C(3,k)/C(4,k): 1/4, 1/2, 1 (same for both questions)
    assert cur["pass_at_k"] == pytest.approx([0.25, 0.5, 1.0])
    # self-select: "top" right iff its correct candidate is kept (k/4); "bottom" right only at k=1 (1/4)
    assert cur["best_of_k_self"] == pytest.approx([(0.25 + 0.25) / 2, (0.5 + 0.0) / 2, (1.0 + 0.0) / 2])
    # all answers distinct: both votes reduce to the top score
    assert cur["weighted_vote"] == pytest.approx(cur["best_of_k_self"])
    assert cur["majority_vote"] == pytest.approx(cur["best_of_k_self"])
    # at k = group size the curve meets the headline metrics; k=1 self-select is the candidate accuracy
    m = assessment_metrics([top, bottom])
    for rule in ("best_of_k_self", "weighted_vote", "majority_vote", "pass_at_k"):
        assert cur[rule][-1] == pytest.approx(m[rule])
    assert cur["best_of_k_self"][0] == pytest.approx(m["mean_candidate_acc"])


def test_acc_vs_k_default_ks_and_small_groups():
    g = [
        group("big", "1", [cand("1", True, -0.1 * i) for i in range(1, 6)]),
        group("small", "1", [cand("2", False, -0.1)]),
    ]
    cur = acc_vs_k(g)
    assert cur["k"] == [1, 2, 4, 5]  # powers of two, then the largest group size
    assert cur["pass_at_k"] == pytest.approx([0.5] * 4)  # "small" keeps its one (wrong) candidate
    with pytest.raises(ValueError, match="positive integers"):
        acc_vs_k(g, ks=[0])


def test_acc_vs_k_sampled_subsets_are_deterministic_and_order_free():
    # n=10, k=3: C(10,3) = 120 subsets > 20, so subsets are sampled
    g = [group(f"q{j}", "1", [cand("1", i == j, -0.05 * i) for i in range(10)]) for j in range(3)]
    a = acc_vs_k(g, ks=[3])
    assert a == acc_vs_k(g, ks=[3])
    rev = acc_vs_k(list(reversed(g)), ks=[3])
    assert rev["best_of_k_self"] == pytest.approx(a["best_of_k_self"])
    assert a["pass_at_k"] == pytest.approx([1 - 84 / 120])
    # with enough subsets allowed the expectation is exact: q0's correct candidate is the top one, so
    # it wins iff kept (3/10); q1 wins iff kept and q0's candidate is not: C(8,2)/C(10,3) = 28/120
    exact = acc_vs_k(g, ks=[3], n_subsets=120)
    assert exact["best_of_k_self"] == pytest.approx([(36 / 120 + 28 / 120 + 21 / 120) / 3])
    # the sampled estimate stays close to it
    assert abs(a["best_of_k_self"][0] - exact["best_of_k_self"][0]) < 0.25


def test_metrics_are_json_serialisable_plain_types():
    m = assessment_metrics(toy_groups())
    back = json.loads(json.dumps(m))
    assert back["assessment_acc_macro"] == pytest.approx(m["assessment_acc_macro"])
    assert set(back["acc_vs_k"]) == {"k", "best_of_k_self", "weighted_vote", "majority_vote", "pass_at_k"}


def test_displacement_alarm():
    hist = [
        {"step": 0, "loss": 2.0},
        {"step": 5, "mean_score_positive": -0.5},
        {"step": 10, "mean_score_positive": -0.6},
        {"step": 20, "mean_score_positive": -0.75},
    ]
    alarm = displacement_alarm(hist, "mean_score_positive", 0.2)
    assert alarm is not None
    assert alarm["step"] == 20 and alarm["start_step"] == 5
    assert alarm["start_value"] == -0.5 and alarm["value"] == -0.75
    assert alarm["drop"] == pytest.approx(0.25)
    assert "mean_score_positive" in alarm["message"]
    assert displacement_alarm(hist, "mean_score_positive", 0.25) is None  # not more than the threshold
    # judged on the current value: a dip that recovered raises nothing
    recovered = hist + [{"step": 30, "mean_score_positive": -0.55}]
    assert displacement_alarm(recovered, "mean_score_positive", 0.2) is None
    rising = [{"step": 0, "mean_score_reference": -1.0}, {"step": 1, "mean_score_reference": -0.2}]
    assert displacement_alarm(rising, "mean_score_reference", 0.0) is None
    assert displacement_alarm(hist[:2], "mean_score_positive", 0.0) is None  # one point: nothing to compare
    assert displacement_alarm(hist, "absent", 0.1) is None
    with pytest.raises(ValueError, match="threshold"):
        displacement_alarm(hist, "mean_score_positive", -0.1)
