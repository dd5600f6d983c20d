"""Ranking feedback from step-by-step checks (no reward model), and RFT's reasoning-path dedupe."""

from __future__ import annotations

from aftune.records import Candidate
from aftune.tasks.answers import equation_list

__all__ = ["rank_key", "assign_ranks", "levenshtein", "rft_select"]


def rank_key(c: Candidate) -> tuple[int, int]:
    """Sort key, smaller is better: correct answers first, then fewer wrong calculator steps."""
    return (0 if c.correct else 1, c.wrong_steps or 0)


def assign_ranks(candidates: list[Candidate]) -> None:
    """Set each candidate's `rank` in place: dense ranks (0 = best, ties share a rank) by `rank_key`.

    Order: correct with no wrong step > correct with wrong steps (fewer better) > wrong answer
    with fewer wrong steps > wrong answer with more.  `wrong_steps` None counts as 0.
    """
    levels = {k: r for r, k in enumerate(sorted({rank_key(c) for c in candidates}))}
    for c in candidates:
        c.rank = levels[rank_key(c)]


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert, delete, substitute all cost 1).

    Bit-parallel form of the standard DP (Myers 1999 / Hyyro 2001): one column of vertical
    deltas D[i][j] - D[i-1][j] in {-1, 0, +1} is held as two bit masks over b's positions, so each
    character of `a` costs a few big-integer operations instead of len(b) Python steps.
    """
    # A shared prefix/suffix never changes the distance; trimming it makes near-duplicates cheap.
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    a, b = a[start:], b[start:]
    end = 0
    while end < len(a) and end < len(b) and a[-1 - end] == b[-1 - end]:
        end += 1
    if end:
        a, b = a[:-end], b[:-end]
    if not a or not b:
        return len(a) + len(b)
    m = len(b)
    full, top = (1 << m) - 1, 1 << (m - 1)
    peq: dict[str, int] = {}
    for j, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << j)
    pv, mv, score = full, 0, m  # column 0: D[j] = j, all vertical deltas +1
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & full)
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & full  # row 0 grows by one per column: horizontal delta +1 enters
        mh = (mh << 1) & full
        pv = mh | (~(xv | ph) & full)
        mv = ph & xv
    return score


def rft_select(candidates: list[str], kept: list[str] | None = None) -> list[str]:
    """RFT's dedupe (Yuan et al. 2023): one new candidate per distinct equation list.

    Equation lists already present among `kept` (e.g. the reference) are skipped.  Equation lists
    are visited in order of first appearance among `candidates`; within one, the candidate with
    the largest summed edit distance to everything kept so far (`kept` plus earlier selections)
    wins, the earliest on ties.  Returns the selected candidates in selection order.
    """
    pool = list(kept or [])
    seen = {equation_list(k) for k in pool}
    groups: dict[tuple[str, ...], list[str]] = {}
    for c in candidates:
        groups.setdefault(equation_list(c), []).append(c)
    selected: list[str] = []
    for eqs, members in groups.items():
        if eqs in seen:
            continue
        best, best_d = members[0], -1
        unique = list(dict.fromkeys(members))  # exact duplicates need scoring once
        for m in unique if len(unique) > 1 else ():
            d = sum(levenshtein(m, k) for k in pool)
            if d > best_d:
                best, best_d = m, d
        selected.append(best)
        pool.append(best)
        seen.add(eqs)
    return selected
