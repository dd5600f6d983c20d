"""Assessment diagnostics over scored candidate sets (docs/method.md, Metrics and Eq. 14).

Every function takes `groups` (one per question, each with its sampled candidates) and optionally
`scores`, a list of per-candidate scores aligned with each group's `candidates` (scores under the
model being assessed). Without `scores`, each candidate's own `.score` is used. Scores are
length-normalised log-likelihoods in nats per token; perplexity is exp(-score).

Conventions (documented choices where the paper is silent):

* Candidates flagged `is_reference` are the gold solution, not model samples. They are left out of
  the assessment pairs unless `include_reference=True` (then they count as one more positive), and
  they never take part in the selection metrics (picking the gold text is not a model prediction).
* Assessment accuracy counts a tied pair (s_p == s_n) as 1/2: a model that cannot tell the two apart
  is at chance, and this keeps the metric equal to the AUC of score for positive-vs-negative.
* A vote's prediction is the winning extracted answer; it is correct when the candidates carrying that
  answer are marked correct (the task grader set `correct`, so the task's own answer matching is
  reused rather than re-comparing strings here). Candidates without an answer (None) never win.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

from aftune.records import Group

RULES = ("best_of_k_self", "weighted_vote", "majority_vote", "pass_at_k")
DEFAULT_SUBSETS = 20
DEFAULT_SEED = 0

# One candidate as the selection rules see it: (extracted answer, correct, score).
_Cand = tuple[str | None, bool, float]


def _resolve_scores(groups: Sequence[Group], scores: Sequence[Sequence[float]] | None) -> list[list[float]]:
    """Scores aligned with each group's candidates; ValueError naming the group when one is missing."""
    if scores is not None and len(scores) != len(groups):
        raise ValueError(f"scores has {len(scores)} entries but there are {len(groups)} groups")
    out: list[list[float]] = []
    for gi, g in enumerate(groups):
        if scores is not None:
            row = list(scores[gi])
            if len(row) != len(g.candidates):
                raise ValueError(f"group {g.id!r}: {len(row)} scores for {len(g.candidates)} candidates")
        else:
            row = [c.score for c in g.candidates]  # type: ignore[misc]
        for ci, s in enumerate(row):
            if s is None:
                raise ValueError(
                    f"group {g.id!r}: candidate {ci} has no score (score the candidates first or pass scores=)"
                )
            if not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"group {g.id!r}: candidate {ci} has a non-finite score {s!r}")
        out.append([float(s) for s in row])
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when fewer than 2 points or either variable is constant."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


# --- selection rules (each on candidates in their original order) ---------------------------------


def _top_index(cands: Sequence[_Cand]) -> int:
    """Index of the top-scored candidate; the first one wins a tie."""
    return max(range(len(cands)), key=lambda i: (cands[i][2], -i))


def _self_select(cands: Sequence[_Cand]) -> tuple[str | None, bool]:
    """Top-scored candidate's (answer, correct)."""
    best = _top_index(cands)
    return cands[best][0], cands[best][1]


def _vote_winner(cands: Sequence[_Cand], tally: dict[str, list[float]]) -> tuple[str | None, bool]:
    """Pick the answer with the largest key (compared in order; first seen wins exact ties)."""
    if not tally:
        return None, False
    order = list(tally)  # dicts keep first-seen order
    winner = order[0]
    for ans in order[1:]:
        if tally[ans] > tally[winner]:  # strict: the earlier answer keeps an exact tie
            winner = ans
    return winner, any(c[1] for c in cands if c[0] == winner)


def _weighted_vote(cands: Sequence[_Cand]) -> tuple[str | None, bool]:
    """Vote with weights exp(s_i) / sum_j exp(s_j) over the question's candidates.

    exp(s) with s per token is the geometric-mean token probability, so long solutions are not
    drowned out as they would be with exp(s * length); normalising per question makes weights sum to 1
    (it does not change the winner). Subtracting the max keeps exp from overflowing.
    """
    m = max(c[2] for c in cands)
    ws = [math.exp(c[2] - m) for c in cands]
    z = sum(ws)
    tally: dict[str, list[float]] = {}
    for c, w in zip(cands, ws):
        if c[0] is not None:
            tally.setdefault(c[0], [0.0])[0] += w / z
    return _vote_winner(cands, tally)


def _majority_vote(cands: Sequence[_Cand]) -> tuple[str | None, bool]:
    """Most frequent answer; ties go to the highest summed score, then to the first seen."""
    tally: dict[str, list[float]] = {}
    for ans, _, s in cands:
        if ans is not None:
            t = tally.setdefault(ans, [0.0, 0.0])
            t[0] += 1
            t[1] += s
    return _vote_winner(cands, tally)


def _pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): chance that k of n candidates (c correct) include a correct one."""
    if n == 0:
        return 0.0
    k = min(k, n)  # a question with fewer than k candidates keeps all of them
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _subsets(n: int, k: int, n_subsets: int, rng: random.Random) -> list[tuple[int, ...]]:
    """All k-subsets when there are at most n_subsets of them (exact expectation), else a seeded sample."""
    k = min(k, n)
    if math.comb(n, k) <= n_subsets:
        return list(itertools.combinations(range(n), k))
    return [tuple(sorted(rng.sample(range(n), k))) for _ in range(n_subsets)]


# --- per question ---------------------------------------------------------------------------------


def _question_row(g: Group, row_scores: list[float], include_reference: bool) -> dict[str, Any]:
    pos = [s for c, s in zip(g.candidates, row_scores) if c.correct and (include_reference or not c.is_reference)]
    neg = [s for c, s in zip(g.candidates, row_scores) if not c.correct and (include_reference or not c.is_reference)]
    wins = 0.0
    for sp in pos:
        for sn in neg:
            wins += 1.0 if sp > sn else 0.5 if sp == sn else 0.0
    mixed = bool(pos) and bool(neg)
    sel: list[_Cand] = [(c.answer, c.correct, s) for c, s in zip(g.candidates, row_scores) if not c.is_reference]

    r: dict[str, Any] = {
        "id": g.id,
        "gold_answer": g.answer,
        "n_candidates": len(sel),
        "n_positive": sum(c[1] for c in sel),
        "n_negative": sum(not c[1] for c in sel),
        "mixed": mixed,
        "n_pairs": len(pos) * len(neg),
        "pair_wins": wins,
        "assessment_acc": wins / (len(pos) * len(neg)) if mixed else None,
        "negative_outranks_all_positives": (max(neg) > max(pos)) if mixed else None,
    }
    if sel:
        best = _top_index(sel)
        wv, mv = _weighted_vote(sel), _majority_vote(sel)
        r.update(
            {
                "best_of_k_self_answer": sel[best][0],
                "best_of_k_self_correct": sel[best][1],
                "best_of_k_self_score": sel[best][2],
                "weighted_vote_answer": wv[0],
                "weighted_vote_correct": wv[1],
                "majority_vote_answer": mv[0],
                "majority_vote_correct": mv[1],
                "pass_at_k": any(c[1] for c in sel),
                "candidate_acc": sum(c[1] for c in sel) / len(sel),
            }
        )
    else:
        for key in (
            "best_of_k_self_answer",
            "best_of_k_self_correct",
            "best_of_k_self_score",
            "weighted_vote_answer",
            "weighted_vote_correct",
            "majority_vote_answer",
            "majority_vote_correct",
            "pass_at_k",
            "candidate_acc",
        ):
            r[key] = None
    return r


def per_question(
    groups: Sequence[Group], scores: Sequence[Sequence[float]] | None = None, *, include_reference: bool = False
) -> list[dict[str, Any]]:
    """One row per question: its assessment accuracy and what each selection rule predicts.

    Rows keep the input order, so two models' rows pair up for paired significance tests.
    Selection fields are None for a question with no (non-reference) candidates; `assessment_acc` is
    None unless the question has both positives and negatives.
    """
    resolved = _resolve_scores(groups, scores)
    return [_question_row(g, s, include_reference) for g, s in zip(groups, resolved)]


def _selection_candidates(groups: Sequence[Group], resolved: list[list[float]]) -> list[tuple[str, list[_Cand]]]:
    out = []
    for g, row in zip(groups, resolved):
        sel = [(c.answer, c.correct, s) for c, s in zip(g.candidates, row) if not c.is_reference]
        if sel:
            out.append((g.id, sel))
    return out


def _default_ks(max_n: int) -> list[int]:
    ks, k = [], 1
    while k <= max_n:
        ks.append(k)
        k *= 2
    if max_n >= 1 and ks[-1] != max_n:
        ks.append(max_n)  # always end at "all candidates" so the curve meets the headline numbers
    return ks


def acc_vs_k(
    groups: Sequence[Group],
    scores: Sequence[Sequence[float]] | None = None,
    ks: Sequence[int] | None = None,
    n_subsets: int = DEFAULT_SUBSETS,
    seed: int = DEFAULT_SEED,
) -> dict[str, list[Any]]:
    """Expected accuracy of each selection rule when every question keeps only k of its candidates.

    pass@k uses the unbiased estimator 1 - C(n-c,k)/C(n,k). The other rules are averaged over the
    k-subsets of each question: all of them when there are at most `n_subsets`, else `n_subsets`
    random ones drawn from an RNG seeded by (seed, question id, k), so results do not depend on the
    order of questions or on other ks. A question with n < k candidates keeps all n.
    Returns {"k": [...], rule: [accuracy per k, None when no question has candidates]}.
    """
    resolved = _resolve_scores(groups, scores)
    qs = _selection_candidates(groups, resolved)
    max_n = max((len(sel) for _, sel in qs), default=0)
    ks = _default_ks(max_n) if ks is None else list(ks)
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"ks must be positive integers, got {k!r}")
    out: dict[str, list[Any]] = {"k": ks, **{rule: [] for rule in RULES}}
    for k in ks:
        if not qs:
            for rule in RULES:
                out[rule].append(None)
            continue
        tot = {rule: 0.0 for rule in RULES}
        for qid, sel in qs:
            n = len(sel)
            tot["pass_at_k"] += _pass_at_k_unbiased(n, sum(c[1] for c in sel), k)
            rng = random.Random(f"{seed}|{qid}|{k}")  # str seeds hash deterministically (sha512)
            subs = _subsets(n, k, n_subsets, rng)
            for rule, fn in (
                ("best_of_k_self", _self_select),
                ("weighted_vote", _weighted_vote),
                ("majority_vote", _majority_vote),
            ):
                tot[rule] += sum(fn([sel[i] for i in sub])[1] for sub in subs) / len(subs)
        for rule in RULES:
            out[rule].append(tot[rule] / len(qs))
    return out


def assessment_metrics(
    groups: Sequence[Group],
    scores: Sequence[Sequence[float]] | None = None,
    reference_scores: Sequence[float | None] | None = None,
    ks: Sequence[int] | None = None,
    *,
    include_reference: bool = False,
    n_subsets: int = DEFAULT_SUBSETS,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """All assessment diagnostics as one JSON-serialisable dict (scalars plus the `acc_vs_k` curves).

    assessment_acc_macro / _micro: fraction of (positive, negative) pairs with s_p > s_n (ties = 1/2),
    averaged over mixed questions / pooled over all pairs. frac_negative_outranks_all_positives: among
    mixed questions, how often the best negative scores strictly above every positive.
    ppl_* are means over candidates of exp(-score); the reference comes from `reference_scores`
    (one per group, None entries skipped) or, without it, from the groups' is_reference candidates.
    score_correct_corr: point-biserial (Pearson) correlation of score with correctness over the
    assessed candidates. Selection metrics average over all questions with at least one sampled
    candidate; mean_candidate_acc is the mean per-question fraction of correct candidates (= pass@1).
    Every metric is None when there is nothing to compute it over.
    """
    resolved = _resolve_scores(groups, scores)
    if reference_scores is not None and len(reference_scores) != len(groups):
        raise ValueError(f"reference_scores has {len(reference_scores)} entries but there are {len(groups)} groups")
    rows = [_question_row(g, s, include_reference) for g, s in zip(groups, resolved)]

    pos_s, neg_s, all_s, all_y = [], [], [], []
    ref_s: list[float] = []
    for gi, (g, row) in enumerate(zip(groups, resolved)):
        for c, s in zip(g.candidates, row):
            if c.is_reference and reference_scores is None:
                ref_s.append(s)
            if c.is_reference and not include_reference:
                continue
            (pos_s if c.correct else neg_s).append(s)
            all_s.append(s)
            all_y.append(1.0 if c.correct else 0.0)
        if reference_scores is not None and reference_scores[gi] is not None:
            rs = float(reference_scores[gi])  # type: ignore[arg-type]
            if not math.isfinite(rs):
                raise ValueError(f"group {g.id!r}: non-finite reference score {rs!r}")
            ref_s.append(rs)

    mixed = [r for r in rows if r["mixed"]]
    n_pairs = sum(r["n_pairs"] for r in rows)
    sel_rows = [r for r in rows if r["n_candidates"] > 0]

    def sel_mean(key: str) -> float | None:
        return _mean([float(r[key]) for r in sel_rows])

    m: dict[str, Any] = {
        "n_questions": len(groups),
        "n_questions_selection": len(sel_rows),
        "n_candidates": sum(r["n_candidates"] for r in rows),
        "n_questions_mixed": len(mixed),
        "n_questions_only_positive": sum(1 for r in rows if r["n_positive"] > 0 and r["n_negative"] == 0),
        "n_questions_only_negative": sum(1 for r in rows if r["n_negative"] > 0 and r["n_positive"] == 0),
        "n_pairs": n_pairs,
        "assessment_acc_macro": _mean([r["assessment_acc"] for r in mixed]),
        "assessment_acc_micro": sum(r["pair_wins"] for r in rows) / n_pairs if n_pairs else None,
        "frac_negative_outranks_all_positives": _mean([float(r["negative_outranks_all_positives"]) for r in mixed]),
        "mean_score_positive": _mean(pos_s),
        "mean_score_negative": _mean(neg_s),
        "mean_score_reference": _mean(ref_s),
        "ppl_positive": _mean([math.exp(-s) for s in pos_s]),
        "ppl_negative": _mean([math.exp(-s) for s in neg_s]),
        "ppl_reference": _mean([math.exp(-s) for s in ref_s]),
        "score_correct_corr": _pearson(all_s, all_y),
        "best_of_k_self": sel_mean("best_of_k_self_correct"),
        "weighted_vote": sel_mean("weighted_vote_correct"),
        "majority_vote": sel_mean("majority_vote_correct"),
        "pass_at_k": sel_mean("pass_at_k"),
        "mean_candidate_acc": sel_mean("candidate_acc"),
    }
    m["acc_vs_k"] = acc_vs_k(groups, resolved, ks=ks, n_subsets=n_subsets, seed=seed)
    return m


def displacement_alarm(history: Sequence[dict[str, Any]], key: str, threshold: float) -> dict[str, Any] | None:
    """Warn of likelihood displacement: `key` has fallen more than `threshold` below its first value.

    DPO-style losses can lower the likelihood of the *preferred* solutions too while widening the
    margin; watching e.g. mean_score_positive or mean_score_reference (nats per token) catches it.
    Entries without the key (or with None / NaN) are skipped. Returns None when there is no alarm.
    """
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"threshold must be a non-negative number of nats per token, got {threshold!r}")
    points = [
        (h.get("step"), float(h[key])) for h in history if h.get(key) is not None and not math.isnan(float(h[key]))
    ]
    if len(points) < 2:
        return None
    (start_step, start), (step, current) = points[0], points[-1]
    drop = start - current
    if drop <= threshold:
        return None
    return {
        "key": key,
        "step": step,
        "start_step": start_step,
        "start_value": start,
        "value": current,
        "drop": drop,
        "threshold": threshold,
        "message": (
            f"likelihood displacement: {key} fell {drop:.4f} nats/token below its first value "
            f"({start:.4f} at step {start_step} -> {current:.4f} at step {step}; threshold {threshold})"
        ),
    }
