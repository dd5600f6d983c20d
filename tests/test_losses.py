"""Tests of aftune.losses against hand computations (plain `math`), gradient directions, edge cases.

Hand numbers are derived in the comments; a small plain-Python reference (loops over pairs, with
hand-derived gradients of lse0 / hinge) checks random cases with ties and masks.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable

import pytest
import torch

from aftune import losses as L

F64 = torch.float64


def leaf(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def value_and_grad(fn: Callable[[torch.Tensor], torch.Tensor], values, dtype=F64):
    x = leaf(values, dtype)
    out = fn(x)
    out.sum().backward()
    return out.detach(), x.grad


def assert_close(actual: torch.Tensor, expected, tol: float = 1e-10) -> None:
    exp = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == exp.shape, (actual.shape, exp.shape)
    assert torch.allclose(actual, exp, atol=tol, rtol=tol), (actual, exp)


# --------------------------------------------------------------------------- building blocks


def test_lse0_values_empty_and_stability():
    x = torch.tensor([[0.3, -1.2, 2.0]], dtype=F64)
    assert_close(L.lse0(x), [math.log(1 + math.exp(0.3) + math.exp(-1.2) + math.exp(2.0))])
    mask = torch.tensor([[True, False, True]])
    assert_close(L.lse0(x, mask), [math.log(1 + math.exp(0.3) + math.exp(2.0))])
    empty = torch.zeros(2, 0, dtype=F64)
    assert_close(L.lse0(empty), [0.0, 0.0])
    # log(1 + e^1e4 + e^(1e4 - 1)) = 1e4 + log(1 + e^-1) up to e^-1e4
    big = torch.tensor([[1e4, 1e4 - 1.0, -1e4]], dtype=torch.float32)
    assert_close(L.lse0(big), torch.tensor([1e4 + math.log(1 + math.exp(-1.0))]), tol=1e-5)


def test_lse0_masked_nan_gives_zero_grad():
    x = leaf([[0.5, float("nan"), float("inf")]])
    mask = torch.tensor([[True, False, False]])
    L.lse0(x, mask).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, [[sig(0.5), 0.0, 0.0]])


def test_pair_mask_ties_and_invalid():
    ranks = torch.tensor([[0, 1, 1, 2, -7]])  # slot 4 invalid with a rank that would be "best"
    valid = torch.tensor([[True, True, True, True, False]])
    m = L.pair_mask(ranks, valid)[0]
    expected = {(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)}
    got = {(i, j) for i in range(5) for j in range(5) if m[i, j]}
    assert got == expected
    assert L.pair_mask(ranks).shape == (1, 5, 5)
    assert bool(L.pair_mask(ranks)[0, 4, 0])  # without valid, rank -7 is the best


def test_binary_pair_mask():
    positive = torch.tensor([[True, False, True, False]])
    valid = torch.tensor([[True, True, True, False]])
    m = L.binary_pair_mask(positive, valid)[0]
    got = {(i, j) for i in range(4) for j in range(4) if m[i, j]}
    assert got == {(0, 1), (2, 1)}


def test_sequence_scores_sum_mean_and_empty():
    logps = leaf([[-0.5, -1.5, float("nan")], [-2.0, -1.0, -3.0], [float("nan"), 7.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    total, mean = L.sequence_scores(logps, mask)
    assert_close(total.detach(), [-2.0, -6.0, 0.0])
    assert_close(mean.detach(), [-1.0, -2.0, 0.0])
    (total.sum() + mean.sum()).backward()
    assert torch.isfinite(logps.grad).all()
    # d(sum)/dx = 1 and d(mean)/dx = 1/n on response tokens, 0 elsewhere (and for the empty row)
    assert_close(logps.grad, [[1.5, 1.5, 0.0], [4 / 3, 4 / 3, 4 / 3], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError):
        L.sequence_scores(torch.zeros(2, 3), torch.ones(2, 4))


def test_pair_terms_detach_and_boundary():
    s = leaf([[0.0, -1.0]])
    pairs = L.pair_mask(torch.tensor([[0, 1]]))
    t = L.pair_terms(s, pairs, "detach")
    assert not t.worse.requires_grad and t.boundary is None
    t = L.pair_terms(s, pairs, "boundary", beta=0.25)
    # B_1 = 0 - 0.25; T_01 = 2 * B_1 - s_0 = -0.5; boundary = T - s_1 = 0.5
    assert_close(t.bound.detach(), [[0.0, -0.25]])
    assert_close(t.boundary[0, 0, 1].detach(), 0.5)
    assert_close(t.margin[0, 0, 1].detach(), -1.0)
    with pytest.raises(ValueError):
        L.pair_terms(s, pairs, "hinge")
    assert L.CONSTRAINTS == ("none", "detach", "boundary")


# --------------------------------------------------------------------------- binary AFT losses

# One question: positives s0 = -0.5, s3 = -0.8; negatives s1 = -1.0, s2 = -2.0.
BIN_S = [[-0.5, -1.0, -2.0, -0.8]]
BIN_P = torch.tensor([[True, False, False, True]])
# s_n - s_p: (0,1) -0.5, (0,2) -1.5, (3,1) -0.2, (3,2) -1.2
E = math.exp
Z_A = 1 + E(-0.5) + E(-1.5) + E(-0.2) + E(-1.2)


def test_alignment_loss_hand():
    val, g = value_and_grad(lambda s: L.alignment_loss(s, BIN_P), BIN_S)
    assert_close(val, [math.log(Z_A)])
    expected = [
        -(E(-0.5) + E(-1.5)) / Z_A,  # positive 0: pushed up
        (E(-0.5) + E(-0.2)) / Z_A,  # negative 1: pushed down
        (E(-1.5) + E(-1.2)) / Z_A,  # negative 2: pushed down
        -(E(-0.2) + E(-1.2)) / Z_A,  # positive 3: pushed up
    ]
    assert_close(g, [expected])


def test_detached_constraint_hand():
    val, g = value_and_grad(lambda s: L.detached_constraint_loss(s, BIN_P), BIN_S)
    assert_close(val, [math.log(Z_A)])
    assert_close(g, [[-(E(-0.5) + E(-1.5)) / Z_A, 0.0, 0.0, -(E(-0.2) + E(-1.2)) / Z_A]])
    assert (g[0, [1, 2]] == 0).all()  # exactly zero, not just small


def test_boundary_constraint_hand():
    # beta = 0.3: B = min(-0.5, -0.8) - 0.3 = -1.1; T_0 = 2B - s0 = -1.7; T_3 = 2B - s3 = -1.4
    # T_p - s_n: (0,1) -0.7, (0,2) 0.3, (3,1) -0.4, (3,2) 0.6
    z = Z_A + E(-0.7) + E(0.3) + E(-0.4) + E(0.6)
    val, g = value_and_grad(lambda s: L.boundary_constraint_loss(s, BIN_P, beta=0.3), BIN_S)
    assert_close(val, [math.log(z)])
    expected = [
        -(E(-0.5) + E(-1.5)) / z,  # T is a constant: positives only see the margin terms
        (E(-0.5) + E(-0.2) - E(-0.7) - E(-0.4)) / z,
        (E(-1.5) + E(-1.2) - E(0.3) - E(0.6)) / z,
        -(E(-0.2) + E(-1.2)) / z,
    ]
    assert_close(g, [expected])
    # s1 = -1.0 is above B = -1.1: pushed down; s2 = -2.0 is below: pulled up.
    assert g[0, 1] > 0 and g[0, 2] < 0


@pytest.mark.parametrize("beta, direction", [(0.2, -1), (2.0, +1)])
def test_boundary_direction_small_vs_large_beta(beta, direction):
    # gap s_p - s_n = 1. beta < gap: B above the negative, which is pulled up (grad < 0);
    # beta > gap: B below it, the negative is pushed down (grad > 0).
    _, g = value_and_grad(
        lambda s: L.boundary_constraint_loss(s, torch.tensor([[True, False]]), beta=beta),
        [[0.0, -1.0]],
    )
    # one pair: T = 2(0 - beta) - 0 = -2 beta; dL/ds_n = (e^{-1} - e^{T + 1}) / Z
    t = -2 * beta
    z = 1 + E(-1.0) + E(t + 1.0)
    assert_close(g, [[-E(-1.0) / z, (E(-1.0) - E(t + 1.0)) / z]])
    assert math.copysign(1, g[0, 1].item()) == direction
    assert g[0, 0] < 0  # the positive always goes up


def test_boundary_equilibrium_at_b():
    # Negative exactly at B = s_p - beta: zero gradient on it.
    _, g = value_and_grad(
        lambda s: L.boundary_constraint_loss(s, torch.tensor([[True, False]]), beta=0.25),
        [[-1.0, -1.25]],
    )
    assert abs(g[0, 1].item()) < 1e-15


# --------------------------------------------------------------------------- ranked AFT losses

# scores 0.2 > -0.3 = -0.3 (tied) > -1.0; pairs (0,1) (0,2) (0,3) (1,3) (2,3)
RK_S = [[0.2, -0.3, -0.3, -1.0]]
RK_R = torch.tensor([[0, 1, 1, 2]])
# s_j - s_i: (0,1) -0.5, (0,2) -0.5, (0,3) -1.2, (1,3) -0.7, (2,3) -0.7
Z_RA = 1 + 2 * E(-0.5) + E(-1.2) + 2 * E(-0.7)


def test_ranked_alignment_hand():
    val, g = value_and_grad(lambda s: L.ranked_alignment_loss(s, RK_R), RK_S)
    assert_close(val, [math.log(Z_RA)])
    expected = [
        -(2 * E(-0.5) + E(-1.2)) / Z_RA,
        (E(-0.5) - E(-0.7)) / Z_RA,
        (E(-0.5) - E(-0.7)) / Z_RA,
        (E(-1.2) + 2 * E(-0.7)) / Z_RA,
    ]
    assert_close(g, [expected])
    assert g[0, 0] < 0 and g[0, 3] > 0


def test_ranked_detached_hand():
    val, g = value_and_grad(lambda s: L.ranked_detached_constraint_loss(s, RK_R), RK_S)
    assert_close(val, [math.log(Z_RA)])
    # middle candidates keep only their better role; the worst gets exactly 0
    expected = [-(2 * E(-0.5) + E(-1.2)) / Z_RA, -E(-0.7) / Z_RA, -E(-0.7) / Z_RA, 0.0]
    assert_close(g, [expected])
    assert g[0, 3] == 0


def test_ranked_boundary_hand():
    # beta 0.4: B_1 = B_2 = 0.2 - 0.4 = -0.2; B_3 = min(0.2, -0.3, -0.3) - 0.4 = -0.7
    # T_01 = 2B_1 - s0 = -0.6 -> T - s1 = -0.3 (same for (0,2))
    # T_03 = 2B_3 - s0 = -1.6 -> T - s3 = -0.6
    # T_13 = -1.4 + 0.3 = -1.1 -> T - s3 = -0.1 (same for (2,3))
    z = Z_RA + 2 * E(-0.3) + E(-0.6) + 2 * E(-0.1)
    val, g = value_and_grad(lambda s: L.ranked_boundary_constraint_loss(s, RK_R, beta=0.4), RK_S)
    assert_close(val, [math.log(z)])
    expected = [
        -(2 * E(-0.5) + E(-1.2)) / z,
        (E(-0.5) - E(-0.7) - E(-0.3)) / z,
        (E(-0.5) - E(-0.7) - E(-0.3)) / z,
        (E(-1.2) + 2 * E(-0.7) - E(-0.6) - 2 * E(-0.1)) / z,
    ]
    assert_close(g, [expected])
    assert g[0, 3] < 0  # the worst (-1.0) is below B_3 = -0.7: pulled up


@pytest.mark.parametrize("beta, direction", [(0.1, -1), (3.0, +1)])
def test_ranked_boundary_direction_per_level(beta, direction):
    # Three levels; the worst (-2) is 2 below the weakest better one (-0.5).
    # Small beta: B_2 = -0.6 above it -> pulled up. Large beta: B_2 = -3.5 below it -> pushed down.
    _, g = value_and_grad(
        lambda s: L.ranked_boundary_constraint_loss(s, torch.tensor([[0, 1, 2]]), beta=beta),
        [[0.0, -0.5, -2.0]],
    )
    assert math.copysign(1, g[0, 2].item()) == direction
    assert g[0, 0] < 0  # the best is only ever "better": pushed up


def _two_level_cases():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 5, generator=gen, dtype=F64) * -3
    positive = torch.tensor([[True, False, True, False, False], [False, True, True, True, False], [True] * 5])
    valid = torch.tensor([[True] * 5, [True, True, False, True, True], [True] * 5])
    return scores, positive, valid


@pytest.mark.parametrize(
    "binary, ranked",
    [
        (L.alignment_loss, L.ranked_alignment_loss),
        (L.detached_constraint_loss, L.ranked_detached_constraint_loss),
        (
            lambda s, p, v: L.boundary_constraint_loss(s, p, v, beta=0.3),
            lambda s, r, v: L.ranked_boundary_constraint_loss(s, r, v, beta=0.3),
        ),
    ],
)
@pytest.mark.parametrize("levels", [(0, 1), (2, 7)])
def test_ranked_reduce_to_binary_with_two_levels(binary, ranked, levels):
    scores, positive, valid = _two_level_cases()
    ranks = torch.where(positive, levels[0], levels[1])
    a = scores.clone().requires_grad_(True)
    b = scores.clone().requires_grad_(True)
    la, lb = binary(a, positive, valid), ranked(b, ranks, valid)
    (la.sum()).backward()
    (lb.sum()).backward()
    assert_close(lb.detach(), la.detach(), tol=1e-12)
    assert_close(b.grad, a.grad, tol=1e-12)
    assert (la[:2] > 0).all() and la[2] == 0  # the example has real pairs and an all-positive row


# --------------------------------------------------------------------------- RRHF

# scores -0.4 (rank 0), 0.1 and -0.6 (rank 1, tied), -0.2 (rank 2)
RR_S = [[-0.4, 0.1, -0.6, -0.2]]
RR_R = torch.tensor([[0, 1, 1, 2]])
# s_j - s_i: (0,1) 0.5, (0,2) -0.2, (0,3) 0.2, (1,3) -0.3, (2,3) 0.4 -> hinge sum 1.1


def test_rrhf_hand():
    val, g = value_and_grad(lambda s: L.rrhf_loss(s, RR_R), RR_S)
    assert_close(val, [0.5 + 0.2 + 0.4])
    # active pairs (0,1) (0,3) (2,3): better gets -1, worse +1 per active pair
    assert_close(g, [[-2.0, 1.0, -1.0, 2.0]])


def test_rrhf_detach_hand():
    val, g = value_and_grad(lambda s: L.rrhf_loss(s, RR_R, constraint="detach"), RR_S)
    assert_close(val, [1.1])
    assert_close(g, [[-2.0, 0.0, -1.0, 0.0]])


def test_rrhf_boundary_hand():
    # beta 0.05: B_1 = B_2 = -0.45; B_3 = -0.6 - 0.05 = -0.65
    # T_01 - s1 = (-0.9 + 0.4) - 0.1 = -0.6; T_02 - s2 = -0.5 + 0.6 = 0.1 (active)
    # T_03 - s3 = (-1.3 + 0.4) + 0.2 = -0.7; T_13 - s3 = -1.4 + 0.2 = -1.2;
    # T_23 - s3 = -0.7 + 0.2 = -0.5
    val, g = value_and_grad(lambda s: L.rrhf_loss(s, RR_R, constraint="boundary", beta=0.05), RR_S)
    assert_close(val, [1.1 + 0.1])
    assert_close(g, [[-2.0, 1.0, -2.0, 2.0]])  # s2 (far below s0) is now also pulled up


def test_rrhf_zero_when_ordered():
    ranks = torch.tensor([[0, 1, 2]])
    val, g = value_and_grad(lambda s: L.rrhf_loss(s, ranks), [[0.0, -1.0, -2.0]])
    assert_close(val, [0.0])
    assert_close(g, [[0.0, 0.0, 0.0]])


# --------------------------------------------------------------------------- PRO

PRO_S = [[0.5, -0.1, 0.0, -1.0]]
PRO_R = torch.tensor([[0, 1, 1, 2]])  # candidates 1 and 2 tied: not each other's negatives


def test_pro_hand_softmax_form():
    e = [E(x) for x in PRO_S[0]]
    expected = (
        -math.log(e[0] / (e[0] + e[1] + e[2] + e[3])) - math.log(e[1] / (e[1] + e[3])) - math.log(e[2] / (e[2] + e[3]))
    )  # the worst has no worse candidate: no term
    val, g = value_and_grad(lambda s: L.pro_loss(s, PRO_R), PRO_S)
    assert_close(val, [expected])
    z0, z1, z2 = e[0] + e[1] + e[2] + e[3], e[1] + e[3], e[2] + e[3]
    grad = [
        -(1 - e[0] / z0),
        e[1] / z0 - (1 - e[1] / z1),
        e[2] / z0 - (1 - e[2] / z2),
        e[3] / z0 + e[3] / z1 + e[3] / z2,
    ]
    assert_close(g, [grad])
    assert g[0, 0] < 0 and g[0, 3] > 0


def test_pro_detach_hand():
    e = [E(x) for x in PRO_S[0]]
    val, g = value_and_grad(lambda s: L.pro_loss(s, PRO_R, constraint="detach"), PRO_S)
    z0, z1, z2 = e[0] + e[1] + e[2] + e[3], e[1] + e[3], e[2] + e[3]
    # only the numerator role keeps gradient
    assert_close(g, [[-(1 - e[0] / z0), -(1 - e[1] / z1), -(1 - e[2] / z2), 0.0]])
    assert g[0, 3] == 0


def test_pro_boundary_hand():
    # beta 0.2: B_1 = B_2 = 0.3; B_3 = min(0.5, -0.1, 0.0) - 0.2 = -0.3
    # T_01 - s1 = (0.6 - 0.5) + 0.1 = 0.2; T_02 - s2 = 0.1; T_03 - s3 = (-0.6 - 0.5) + 1 = -0.1
    # T_13 - s3 = (-0.6 + 0.1) + 1 = 0.5; T_23 - s3 = (-0.6 - 0.0) + 1 = 0.4
    z0 = 1 + E(-0.6) + E(-0.5) + E(-1.5) + E(0.2) + E(0.1) + E(-0.1)
    z1 = 1 + E(-0.9) + E(0.5)
    z2 = 1 + E(-1.0) + E(0.4)
    val, g = value_and_grad(lambda s: L.pro_loss(s, PRO_R, constraint="boundary", beta=0.2), PRO_S)
    assert_close(val, [math.log(z0) + math.log(z1) + math.log(z2)])
    g3 = (E(-1.5) - E(-0.1)) / z0 + (E(-0.9) - E(0.5)) / z1 + (E(-1.0) - E(0.4)) / z2
    assert_close(g[0, 3], g3)
    assert g[0, 3] < 0  # s3 = -1 is below B_3 = -0.3: pulled up


# --------------------------------------------------------------------------- DPO

DPO_PI = [[-10.0, -12.0, -15.0]]
DPO_REF = torch.tensor([[-11.0, -11.0, -11.0]], dtype=F64)
DPO_R = torch.tensor([[0, 1, 2]])
# beta 0.1: r = [0.1, -0.1, -0.4]; r_w - r_l: (0,1) 0.2, (0,2) 0.5, (1,2) 0.3


def test_dpo_hand():
    val, g = value_and_grad(lambda p: L.dpo_loss(p, DPO_REF, DPO_R, beta=0.1), DPO_PI)
    expected = -(math.log(sig(0.2)) + math.log(sig(0.5)) + math.log(sig(0.3))) / 3
    assert_close(val, [expected])
    b = 0.1
    grad = [
        -b * (sig(-0.2) + sig(-0.5)) / 3,  # better: pushed up
        b * (sig(-0.2) - sig(-0.3)) / 3,
        b * (sig(-0.5) + sig(-0.3)) / 3,  # worse: pushed down
    ]
    assert_close(g, [grad])
    assert g[0, 0] < 0 and g[0, 2] > 0


def test_dpo_reference_gets_no_gradient():
    pi = leaf(DPO_PI)
    ref = DPO_REF.clone().requires_grad_(True)
    L.dpo_loss(pi, ref, DPO_R).sum().backward()
    assert ref.grad is None


def test_dpo_detach_hand():
    _, g = value_and_grad(lambda p: L.dpo_loss(p, DPO_REF, DPO_R, constraint="detach"), DPO_PI)
    b = 0.1
    assert_close(g, [[-b * (sig(-0.2) + sig(-0.5)) / 3, -b * sig(-0.3) / 3, 0.0]])


def test_dpo_boundary_hand():
    # boundary 0.05 on r = [0.1, -0.1, -0.4]: B_1 = 0.05, B_2 = -0.1 - 0.05 = -0.15
    # T_01 - r1 = (0.1 - 0.1) + 0.1 = 0.1; T_02 - r2 = (-0.3 - 0.1) + 0.4 = 0.0;
    # T_12 - r2 = (-0.3 + 0.1) + 0.4 = 0.2
    val = L.dpo_loss(leaf(DPO_PI), DPO_REF, DPO_R, constraint="boundary", boundary=0.05)
    expected = (math.log(1 + E(-0.2) + E(0.1)) + math.log(1 + E(-0.5) + E(0.0)) + math.log(1 + E(-0.3) + E(0.2))) / 3
    assert_close(val.detach(), [expected])


def test_dpo_plackett_luce_hand_with_tie():
    pi = [[-1.0, -2.0, -1.6, -3.0]]
    ref = torch.tensor([[-1.2, -1.5, -1.6, -2.0]], dtype=F64)
    ranks = torch.tensor([[0, 1, 1, 2]])
    # beta 0.5: r = 0.5 * [0.2, -0.5, 0.0, -1.0] = [0.1, -0.25, 0.0, -0.5]
    e = [E(0.1), E(-0.25), E(0.0), E(-0.5)]
    expected = -math.log(e[0] / sum(e)) - math.log(e[1] / (e[1] + e[3])) - math.log(e[2] / (e[2] + e[3]))
    val, g = value_and_grad(lambda p: L.dpo_plackett_luce_loss(p, ref, ranks, beta=0.5), pi)
    assert_close(val, [expected])
    assert g[0, 0] < 0 and g[0, 3] > 0
    assert_close(g[0, 0], -0.5 * (1 - e[0] / sum(e)))


def test_dpo_plackett_luce_two_candidates_equals_dpo():
    pi, ranks = [[-3.0, -2.0]], torch.tensor([[0, 1]])
    ref = torch.tensor([[-2.5, -2.5]], dtype=F64)
    for c in L.CONSTRAINTS:
        a = L.dpo_loss(leaf(pi), ref, ranks, beta=0.3, constraint=c, boundary=0.2)
        b = L.dpo_plackett_luce_loss(leaf(pi), ref, ranks, beta=0.3, constraint=c, boundary=0.2)
        assert_close(b.detach(), a.detach())


# --------------------------------------------------------------------------- generic directions


BASELINES = {
    "rrhf": lambda s, r, v=None, c="none", beta=0.5: L.rrhf_loss(s, r, v, constraint=c, beta=beta),
    "pro": lambda s, r, v=None, c="none", beta=0.5: L.pro_loss(s, r, v, constraint=c, beta=beta),
    # DPO losses act on policy log-probs; a fixed reference and beta = 1 make r = s - ref.
    "dpo": lambda s, r, v=None, c="none", beta=0.5: L.dpo_loss(
        s, _ref_like(s), r, v, beta=1.0, constraint=c, boundary=beta
    ),
    "dpo_pl": lambda s, r, v=None, c="none", beta=0.5: L.dpo_plackett_luce_loss(
        s, _ref_like(s), r, v, beta=1.0, constraint=c, boundary=beta
    ),
}


def _ref_like(s: torch.Tensor) -> torch.Tensor:
    return torch.full(s.shape, -0.7, dtype=s.dtype)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_push_better_up_worse_down(name):
    # worse candidates score above better ones, so every pair is violated
    ranks = torch.tensor([[0, 1, 2]])
    _, g = value_and_grad(lambda s: BASELINES[name](s, ranks), [[-2.0, -1.0, 0.0]])
    assert g[0, 0] < 0 and g[0, 2] > 0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_detach_zero_grad_for_worst(name):
    ranks = torch.tensor([[0, 1, 2, 2]])
    _, g = value_and_grad(lambda s: BASELINES[name](s, ranks, c="detach"), [[-2.0, -1.0, 0.0, 0.5]])
    assert (g[0, 2:] == 0).all()
    assert g[0, 0] < 0 and g[0, 1] < 0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_boundary_pulls_far_below_worst_up(name):
    ranks = torch.tensor([[0, 1]])
    _, g_none = value_and_grad(lambda s: BASELINES[name](s, ranks), [[0.0, -5.0]])
    _, g_bc = value_and_grad(lambda s: BASELINES[name](s, ranks, c="boundary", beta=0.5), [[0.0, -5.0]])
    assert g_none[0, 1] >= 0  # unconstrained: never pulled up
    assert g_bc[0, 1] < 0


# --------------------------------------------------------------------------- plain-Python reference


def _reference(s, ranks, valid, mode, beta, form):
    """Loop-based value and gradient d/ds, independent of the tensor code.

    Terms are (value, {index: d value / d s_index}) with detached parts left out of the dict.
    """
    idx = [k for k in range(len(s)) if valid[k]]
    pairs = [(i, j) for i in idx for j in idx if ranks[i] < ranks[j]]
    bound = {}
    for i, j in pairs:
        bound[j] = min(bound.get(j, math.inf), s[i] - beta)
    per_pair = []
    for i, j in pairs:
        dep = {i: -1.0} if mode == "detach" else {i: -1.0, j: 1.0}
        terms = [(s[j] - s[i], dep)]
        if mode == "boundary":
            terms.append((2 * bound[j] - s[i] - s[j], {j: -1.0}))
        per_pair.append((i, terms))
    grad = [0.0] * len(s)

    def lse0(terms):
        z = 1 + sum(math.exp(v) for v, _ in terms)
        for v, dep in terms:
            for k, c in dep.items():
                grad[k] += c * math.exp(v) / z * scale
        return math.log(z)

    scale = 1.0
    if form == "joint":
        return lse0([t for _, ts in per_pair for t in ts]), grad
    if form == "hinge":
        total = 0.0
        for _, ts in per_pair:
            for v, dep in ts:
                if v > 0:
                    total += v
                    for k, c in dep.items():
                        grad[k] += c
        return total, grad
    if form == "row":
        return sum(lse0([t for i2, ts in per_pair if i2 == i for t in ts]) for i in idx), grad
    if form == "pair_mean":
        scale = 1.0 / max(len(pairs), 1)
        return sum(lse0(ts) for _, ts in per_pair) * scale, grad
    raise AssertionError(form)


RANDOM_CASES = {
    # name: (callable(scores, ranks, valid, constraint, beta), reference form)
    "aft": (None, "joint"),
    "rrhf": (lambda s, r, v, c, b: L.rrhf_loss(s, r, v, constraint=c, beta=b), "hinge"),
    "pro": (lambda s, r, v, c, b: L.pro_loss(s, r, v, constraint=c, beta=b), "row"),
    "dpo": (
        lambda s, r, v, c, b: L.dpo_loss(s, torch.zeros_like(s), r, v, 1.0, c, b),
        "pair_mean",
    ),
    "dpo_pl": (
        lambda s, r, v, c, b: L.dpo_plackett_luce_loss(s, torch.zeros_like(s), r, v, 1.0, c, b),
        "row",
    ),
}
AFT_BY_MODE = {
    "none": lambda s, r, v, b: L.ranked_alignment_loss(s, r, v),
    "detach": lambda s, r, v, b: L.ranked_detached_constraint_loss(s, r, v),
    "boundary": lambda s, r, v, b: L.ranked_boundary_constraint_loss(s, r, v, beta=b),
}


@pytest.mark.parametrize("name", sorted(RANDOM_CASES))
@pytest.mark.parametrize("constraint", L.CONSTRAINTS)
def test_random_cases_match_plain_python(name, constraint):
    rng = random.Random(zlib.crc32(f"{name}/{constraint}".encode()))  # hash() is salted per run
    fn, form = RANDOM_CASES[name]
    if fn is None:
        fn = lambda s, r, v, c, b: AFT_BY_MODE[c](s, r, v, b)  # noqa: E731
    for _ in range(6):
        b_size, k = 3, 6
        s = [[rng.uniform(-3, 1) for _ in range(k)] for _ in range(b_size)]
        r = [[rng.randrange(3) for _ in range(k)] for _ in range(b_size)]
        v = [[rng.random() < 0.8 for _ in range(k)] for _ in range(b_size)]
        beta = rng.choice([0.05, 0.3, 1.5])
        filled = [[x if ok else float("nan") for x, ok in zip(row, vr)] for row, vr in zip(s, v)]
        x = leaf(filled)
        out = fn(x, torch.tensor(r), torch.tensor(v), constraint, beta)
        out.sum().backward()
        for q in range(b_size):
            val, grad = _reference(s[q], r[q], v[q], constraint, beta, form)
            assert out[q].item() == pytest.approx(val, rel=1e-9, abs=1e-12)
            assert x.grad[q].tolist() == pytest.approx(grad, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- edge cases

# Every loss as f(scores, ranks, valid); binary losses read rank 0 as positive.
ALL = {
    "alignment": lambda s, r, v=None: L.alignment_loss(s, r == 0, v),
    "detached": lambda s, r, v=None: L.detached_constraint_loss(s, r == 0, v),
    "boundary": lambda s, r, v=None: L.boundary_constraint_loss(s, r == 0, v, beta=0.3),
    "ranked_alignment": lambda s, r, v=None: L.ranked_alignment_loss(s, r, v),
    "ranked_detached": lambda s, r, v=None: L.ranked_detached_constraint_loss(s, r, v),
    "ranked_boundary": lambda s, r, v=None: L.ranked_boundary_constraint_loss(s, r, v, beta=0.3),
}
for _name, _fn in BASELINES.items():
    for _c in L.CONSTRAINTS:
        ALL[f"{_name}_{_c}"] = lambda s, r, v=None, _fn=_fn, _c=_c: _fn(s, r, v, c=_c, beta=0.3)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize(
    "scores, ranks",
    [
        ([[-1.0, -2.0, -0.5]], [[1, 1, 1]]),  # no positives (binary) / all tied
        ([[-1.0, -2.0, -0.5]], [[0, 0, 0]]),  # no negatives
        ([[-1.0]], [[0]]),  # single candidate
        ([[3.0, -4.0, 0.0, 1.0]], [[2, 2, 2, 2]]),  # all tied, not at rank 0
    ],
)
def test_no_pairs_is_exactly_zero(name, scores, ranks):
    val, g = value_and_grad(lambda s: ALL[name](s, torch.tensor(ranks)), scores)
    assert val.tolist() == [0.0]
    assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("name", sorted(ALL))
def test_empty_question_in_batch_does_not_leak(name):
    # Row 1 has no pairs; row 0 does: row 1 stays exactly 0 and row 0 matches its solo value.
    scores = [[-1.0, -0.2, -0.6], [-0.3, -0.9, -2.0]]  # row 0 violated: RRHF > 0 too
    ranks = torch.tensor([[0, 1, 1], [1, 1, 1]])
    val, g = value_and_grad(lambda s: ALL[name](s, ranks), scores)
    solo, g_solo = value_and_grad(lambda s: ALL[name](s, ranks[:1]), scores[:1])
    assert val[1] == 0 and (g[1] == 0).all()
    assert_close(val[:1], solo)
    assert_close(g[:1], g_solo)
    assert val[0] > 0


@pytest.mark.parametrize("name", sorted(ALL))
def test_valid_mask_with_nan_equals_trimmed(name):
    nan, inf = float("nan"), float("inf")
    full = [[-0.4, nan, -1.3, 0.2, inf], [-inf, -0.9, -0.1, nan, -2.0]]
    ranks = torch.tensor([[0, -3, 1, 2, 0], [0, 1, 0, -9, 2]])  # invalid slots hold "best" ranks
    valid = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    val, g = value_and_grad(lambda s: ALL[name](s, ranks, valid), full)
    assert torch.isfinite(val).all() and torch.isfinite(g).all()
    for q in range(2):
        keep = valid[q].nonzero().flatten().tolist()
        trimmed = [[full[q][k] for k in keep]]
        t_val, t_g = value_and_grad(lambda s: ALL[name](s, ranks[q : q + 1, keep]), trimmed)
        assert_close(val[q : q + 1], t_val)
        assert_close(g[q, keep].unsqueeze(0), t_g)
        assert (g[q, ~valid[q]] == 0).all()


def test_valid_none_equals_all_true():
    s, r = torch.tensor([[0.1, -0.5, -2.0]], dtype=F64), torch.tensor([[0, 1, 2]])
    for fn in ALL.values():
        assert_close(fn(s, r, None), fn(s, r, torch.ones(1, 3, dtype=torch.bool)))


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_large_scores_stay_finite(name, dtype):
    # worse candidates far above better ones (huge violations) and far below (huge boundary pulls)
    scores = [[-1e4, 1e4, 5e3, -5e3], [1e4, -1e4, 0.0, -1e4]]
    ranks = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 2]])
    val, g = value_and_grad(lambda s: ALL[name](s, ranks), scores, dtype)
    assert torch.isfinite(val).all() and torch.isfinite(g).all()
    assert val[0] > 1e3  # the violated row carries a large loss, not a saturated 0/NaN


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_nonpositive_beta_raises(beta):
    s, r = torch.zeros(1, 2), torch.tensor([[0, 1]])
    p = torch.tensor([[True, False]])
    with pytest.raises(ValueError):
        L.boundary_constraint_loss(s, p, beta=beta)
    with pytest.raises(ValueError):
        L.ranked_boundary_constraint_loss(s, r, beta=beta)
    with pytest.raises(ValueError):
        L.rrhf_loss(s, r, constraint="boundary", beta=beta)
    with pytest.raises(ValueError):
        L.pro_loss(s, r, constraint="boundary", beta=beta)
    with pytest.raises(ValueError):
        L.dpo_loss(s, s, r, beta=beta)
    with pytest.raises(ValueError):
        L.dpo_plackett_luce_loss(s, s, r, beta=beta)
    with pytest.raises(ValueError):
        L.dpo_loss(s, s, r, constraint="boundary", boundary=beta)


def test_unknown_constraint_and_bad_shapes_raise():
    s, r = torch.zeros(1, 2), torch.tensor([[0, 1]])
    for fn in (L.rrhf_loss, L.pro_loss):
        with pytest.raises(ValueError):
            fn(s, r, constraint="clip")
    with pytest.raises(ValueError):
        L.dpo_loss(s, s, r, constraint="clip")
    with pytest.raises(ValueError):
        L.alignment_loss(s, torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError):
        L.ranked_alignment_loss(torch.zeros(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        L.dpo_loss(s, torch.zeros(1, 3), r)


def test_per_question_beta_tensor_equals_one_question_at_a_time():
    """beta as a [B] tensor (one margin per question) gives each row exactly its own scalar-beta loss."""
    scores = torch.tensor([[-0.1, -0.3, -0.2], [-0.2, -0.25, -0.9]], requires_grad=True)
    positive = torch.tensor([[True, False, False], [True, True, False]])
    betas = torch.tensor([0.4, 0.6])
    got = L.boundary_constraint_loss(scores, positive, beta=betas)
    rows = [L.boundary_constraint_loss(scores[i : i + 1], positive[i : i + 1], beta=float(betas[i])) for i in range(2)]
    torch.testing.assert_close(got, torch.cat(rows))
    # by hand, question 0: B = -0.1 - 0.4 = -0.5, T = 2B - s_p = -0.9; terms s_n - s_p and T - s_n
    want0 = math.log(1 + math.exp(-0.2) + math.exp(-0.1) + math.exp(-0.6) + math.exp(-0.7))
    assert got[0].item() == pytest.approx(want0, rel=1e-6)
    g_tensor = torch.autograd.grad(got.sum(), scores)[0]
    g_rows = torch.autograd.grad(sum(r.sum() for r in rows), scores)[0]
    torch.testing.assert_close(g_tensor, g_rows)
    # direction: question 1's negative (-0.9) sits below B = -0.25 - 0.6 = -0.85, so it is pulled up
    assert g_tensor[1, 2] < 0  # descent raises it
    # the ranked boundary loss takes the same per-question tensor
    ranks = torch.where(positive, 0, 1)
    torch.testing.assert_close(L.ranked_boundary_constraint_loss(scores, ranks, beta=betas), got)
    for bad in (torch.tensor([0.4]), torch.tensor([0.4, 0.0]), torch.tensor([0.4, float("nan")])):
        with pytest.raises(ValueError, match="beta"):
            L.boundary_constraint_loss(scores, positive, beta=bad)
