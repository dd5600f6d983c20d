import random

import pytest

from aftune.records import Candidate
from aftune.tasks.answers import equation_list
from aftune.tasks.feedback import assign_ranks, levenshtein, rft_select


def cand(correct: bool, wrong: int | None) -> Candidate:
    return Candidate(text="", answer=None, correct=correct, wrong_steps=wrong)


def test_assign_ranks_order_and_ties():
    cs = [
        cand(False, 3),
        cand(True, 1),
        cand(True, 0),
        cand(False, 0),
        cand(True, None),
        cand(True, 1),
        cand(False, 1),
        cand(True, 2),
    ]
    assign_ranks(cs)
    assert [c.rank for c in cs] == [5, 1, 0, 3, 0, 1, 4, 2]


def test_assign_ranks_dense_and_wrong_answer_below_any_correct():
    cs = [cand(True, 5), cand(False, 0)]
    assign_ranks(cs)
    assert [c.rank for c in cs] == [0, 1]  # dense: the best level present is 0 even with wrong steps
    same = [cand(False, 2), cand(False, 2)]
    assign_ranks(same)
    assert [c.rank for c in same] == [0, 0]
    assign_ranks([])  # no candidates: nothing to do


@pytest.mark.parametrize(
    "a, b, d",
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abc", 3),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("abc", "abc", 0),
        ("abc", "acb", 2),
        ("intention", "execution", 5),
        ("a", "b", 1),
    ],
)
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def _levenshtein_naive(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(
        _levenshtein_naive(a[1:], b) + 1,
        _levenshtein_naive(a, b[1:]) + 1,
        _levenshtein_naive(a[1:], b[1:]) + (a[0] != b[0]),
    )


def test_levenshtein_matches_naive_recursion():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("ab") for _ in range(rng.randint(0, 6)))
        b = "".join(rng.choice("ab") for _ in range(rng.randint(0, 6)))
        assert levenshtein(a, b) == _levenshtein_naive(a, b)


def _levenshtein_dp(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_levenshtein_matches_plain_dp_on_longer_strings():
    rng = random.Random(1)
    for _ in range(300):
        alphabet = rng.choice(["ab", "abc", "abcdefgh <>=*"])
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        assert levenshtein(a, b) == _levenshtein_dp(a, b)
    long_a = "x" * 100 + "abc" * 50 + "y" * 100
    long_b = "x" * 100 + "acb" * 50 + "y" * 100
    assert levenshtein(long_a, long_b) == _levenshtein_dp(long_a, long_b)


REF = "She buys 3 * 7 = <<3*7=21>>21 apples.\nNow she has 21 + 5 = <<21+5=26>>26.\n#### 26"


def test_rft_select_hand_example():
    same_as_ref = "3 * 7 = <<3*7=21>>21.\nThen 21 + 5 = <<21+5=26>>26.\n#### 26"  # reference's equations
    swap_close = "She buys 7 * 3 = <<7*3=21>>21 apples.\nNow she has 21 + 5 = <<21+5=26>>26.\n#### 26"
    swap_far = "Bags: <<7*3=21>>21 in all, plus five makes <<21+5=26>>26 altogether!\n#### 26"
    other = "She buys 3 * 7 = <<3*7=21>>21 apples.\nNow she has 5 + 21 = <<5+21=26>>26.\n#### 26"
    no_eq = "26 apples.\n#### 26"
    got = rft_select([same_as_ref, swap_close, other, swap_far, swap_close, no_eq], kept=[REF])
    # One per new equation list, in order of first appearance; within (7*3, 21+5) the farther one.
    assert got == [swap_far, other, no_eq]
    assert levenshtein(swap_far, REF) > levenshtein(swap_close, REF)
    assert len({equation_list(t) for t in got}) == len(got)


def test_rft_select_farthest_from_everything_kept_so_far():
    a1 = "x <<1+1=2>> <<2*3=6>>"
    b_near_a1 = "x <<1+1=2>> <<3*2=6>>"
    b_far = "a quite different text <<1+1=2>> <<3*2=6>>"
    # With nothing kept, the first list's earliest candidate wins; then b_far is farther from a1.
    assert rft_select([a1, b_near_a1, b_far]) == [a1, b_far]
    assert rft_select([]) == []
    assert rft_select([REF, REF], kept=[REF]) == []


def test_rft_select_deterministic():
    rng = random.Random(0)
    texts = [f"t{rng.randint(0, 9)} <<{rng.randint(1, 3)}+1={rng.randint(2, 4)}>>" for _ in range(30)]
    assert rft_select(texts) == rft_select(list(texts))
    assert len(rft_select(texts)) == len({equation_list(t) for t in texts})
