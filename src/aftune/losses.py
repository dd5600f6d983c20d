"""Losses of AFT and of its baselines, as pure functions over tensors (docs/method.md, Eq. 4-13).

Conventions
-----------
* ``scores``: ``[B, K]`` float, the length-normalised log-likelihood ``s`` of each of K
  candidates of each of B questions (higher = preferred). DPO losses take summed log-probs instead.
* ``positive`` / ``valid``: ``[B, K]`` bool. ``valid`` marks real candidates (None = all real).
  Invalid slots may hold anything, NaN and inf included: they are replaced with ``torch.where``
  before any arithmetic, so they reach neither the output nor the gradient (their gradient is 0).
* ``ranks``: ``[B, K]`` int, 0 = best, ties allowed; i is *better than* j iff
  ``ranks[i] < ranks[j]`` and both are valid (``pair_mask``). Binary feedback is the two-level case
  (positives rank 0, negatives rank 1).
* Every loss returns ``[B]``, one value per question. A question without any (better, worse) pair
  gets exactly 0 with a zero (finite) gradient.
* ``lse0(X) = log(1 + sum_{x in X} exp(x))``, 0 for an empty X, computed as a logsumexp over
  ``[0, X]`` so it is stable for large values.

The constraint mechanism (one mechanism for AFT and all baselines)
------------------------------------------------------------------
Every loss here is built from the (better i, worse j) pairs of ``pair_mask`` and from
``pair_terms(values, pairs, constraint, beta)``, which returns for each pair

* ``margin[b, i, j] = w_j - v_i``, where the worse-role value ``w_j`` is ``v_j`` itself
  (``"none"``, ``"boundary"``) or ``sg(v_j)`` (``"detach"``: a candidate gets no gradient from its
  worse role, only from its better role);
* for ``"boundary"`` only, ``boundary[b, i, j] = T_ij - v_j`` with the boundary
  ``B_j = min_{i better than j} v_i - beta`` and the constant ``T_ij = sg(2 * B_j - v_i)``.
  Paired with the margin term ``exp(v_j - v_i)``, the term ``exp(T_ij - v_j)`` makes the pair's
  pull on ``v_j`` vanish exactly at ``v_j = B_j``: a worse candidate is pushed down while above its
  boundary and pulled back up while below it.

Each loss combines these terms in its own form:

==================================  ===========================================================
AFT ``L_A`` / DC / BC (and ranked)  ``lse0(all margins [U all boundary terms])`` over all pairs
RRHF                                ``sum_pairs max(0, margin) [+ max(0, boundary)]``
PRO                                 ``sum_k lse0({margin_kj} [U {boundary_kj}] : j worse than k)``
DPO (pairwise)                      ``mean_pairs lse0({margin_wl} [U {boundary_wl}])`` on rewards
DPO Plackett-Luce                   PRO's form on rewards ``r = beta * (pi - ref)``
==================================  ===========================================================

So ``alignment_loss``, ``detached_constraint_loss`` and ``boundary_constraint_loss`` are literally
the ``"none"``, ``"detach"`` and ``"boundary"`` modes of one function, and the "with constraint"
baselines use the same terms. For DPO the constraint acts on the implicit rewards (the quantity DPO
ranks), and its boundary margin is the ``boundary`` argument, in reward units.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CONSTRAINTS",
    "PairTerms",
    "alignment_loss",
    "binary_pair_mask",
    "boundary_constraint_loss",
    "detached_constraint_loss",
    "dpo_loss",
    "dpo_plackett_luce_loss",
    "lse0",
    "pair_mask",
    "pair_terms",
    "pro_loss",
    "ranked_alignment_loss",
    "ranked_boundary_constraint_loss",
    "ranked_detached_constraint_loss",
    "rrhf_loss",
    "sequence_scores",
]

#: Names accepted by the ``constraint`` argument of ``pair_terms`` and of the baselines.
CONSTRAINTS: tuple[str, ...] = ("none", "detach", "boundary")


# --------------------------------------------------------------------------- validation helpers


def _check_constraint(constraint: str) -> None:
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; expected one of {CONSTRAINTS}")


def _check_positive(name: str, value: float) -> None:
    # Rejects NaN too; inf would make the boundary -inf and silently disable the constraint.
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_2d(name: str, x: Tensor, shape: torch.Size | None = None) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, K], got shape {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _valid_mask(like: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    _check_2d("valid", valid, like.shape)
    return valid.bool()


def _clean(x: Tensor, valid: Tensor) -> Tensor:
    # where (not multiplication by 0) so NaN/inf in invalid slots give value 0 and gradient 0.
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------- building blocks


def lse0(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """``log(1 + sum_{x in X} exp(x))`` along ``dim``, over the entries where ``mask`` is True.

    Computed as ``logsumexp([0, X])`` so it is stable for large values; an empty set gives exactly
    0, and masked entries get exactly zero gradient even when they hold NaN or inf.
    """
    if mask is not None:
        x = torch.where(mask, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device))
    zero_shape = list(x.shape)
    zero_shape[dim] = 1
    return torch.logsumexp(torch.cat([x.new_zeros(zero_shape), x], dim=dim), dim=dim)


def pair_mask(ranks: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[B, K, K]`` bool: ``out[b, i, j]`` is True iff i is better than j (``ranks[b, i] <
    ranks[b, j]``) and both are valid. Ties and invalid slots form no pair."""
    _check_2d("ranks", ranks)
    v = _valid_mask(ranks, valid)
    better = ranks.unsqueeze(2) < ranks.unsqueeze(1)
    return better & v.unsqueeze(2) & v.unsqueeze(1)


def binary_pair_mask(positive: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[B, K, K]`` bool: ``out[b, p, n]`` is True iff p is a valid positive and n a valid negative
    (the two-level case of ``pair_mask``)."""
    _check_2d("positive", positive)
    v = _valid_mask(positive, valid)
    pos = positive.bool() & v
    neg = ~positive.bool() & v
    return pos.unsqueeze(2) & neg.unsqueeze(1)


class PairTerms(NamedTuple):
    """Per-pair terms shared by every loss (see the module docstring). All tensors are indexed
    ``[b, i, j]`` for (better i, worse j); values outside the pair mask are finite but meaningless.
    """

    worse: Tensor  # [B, K]: values used in the worse role (detached for "detach")
    margin: Tensor  # [B, K, K]: worse_j - v_i
    boundary: Tensor | None  # [B, K, K]: T_ij - v_j ("boundary" only)
    bound: Tensor | None  # [B, K]: B_j (0 where j has no better candidate; "boundary" only)


def _beta_column(beta: float | Tensor, values: Tensor) -> float | Tensor:
    """A number, or one margin per question (a ``[B]`` tensor, returned as ``[B, 1]`` to broadcast over j)."""
    if not isinstance(beta, Tensor):
        _check_positive("beta", beta)
        return beta
    if beta.shape not in ((values.shape[0],), (values.shape[0], 1)):
        raise ValueError(f"beta must be a number or [B] = [{values.shape[0]}], got shape {tuple(beta.shape)}")
    if not bool((torch.isfinite(beta) & (beta > 0)).all()):
        raise ValueError("every per-question beta must be a finite number > 0")
    return beta.detach().to(values.dtype).reshape(-1, 1)


def pair_terms(values: Tensor, pairs: Tensor, constraint: str = "none", beta: float | Tensor = 0.5) -> PairTerms:
    """The constraint mechanism shared by all losses.

    ``margin[b, i, j] = w_j - v_i`` with ``w = v`` ("none", "boundary") or ``w = sg(v)`` ("detach").
    For "boundary": ``B_j = min_{i: pairs[b, i, j]} v_i - beta``, ``T_ij = sg(2 * B_j - v_i)`` and
    ``boundary[b, i, j] = T_ij - v_j``. ``values`` must be finite (callers clean invalid slots).
    ``beta`` is one margin, or a ``[B]`` tensor of per-question margins ``beta_b``.
    Raises ValueError for an unknown constraint, or for ``beta <= 0`` with "boundary".
    """
    _check_constraint(constraint)
    _check_2d("values", values)
    if pairs.shape != (*values.shape, values.shape[1]):
        raise ValueError(f"pairs has shape {tuple(pairs.shape)}, expected [B, K, K] for values")
    worse = values.detach() if constraint == "detach" else values
    margin = worse.unsqueeze(1) - values.unsqueeze(2)
    if constraint != "boundary":
        return PairTerms(worse, margin, None, None)
    beta = _beta_column(beta, values)
    v = values.detach()  # the boundary is a target, never a path for gradient
    inf = torch.full((), math.inf, dtype=v.dtype, device=v.device)
    weakest_better = torch.where(pairs, v.unsqueeze(2), inf).amin(dim=1)  # [B, K] indexed by j
    bound = torch.where(pairs.any(dim=1), weakest_better - beta, torch.zeros_like(v))
    target = 2.0 * bound.unsqueeze(1) - v.unsqueeze(2)  # T_ij
    return PairTerms(worse, margin, target - values.unsqueeze(1), bound)


def sequence_scores(token_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed and length-normalised scores of N responses from per-token log-probs.

    ``sum_n = sum_t mask[n, t] * logp[n, t]`` and ``mean_n = sum_n / |{t: mask[n, t]}|``
    (docs/method.md, Eq. 1), both ``[N]``. ``mask`` (any dtype, nonzero = response token) selects response
    tokens; unmasked entries may hold anything (NaN included). A response with zero tokens gets
    ``sum = mean = 0`` and zero gradient instead of a division by zero (no crash mid-training);
    0 is the *highest* possible score, so callers must mark such candidates invalid.
    """
    if token_logps.dim() != 2 or mask.shape != token_logps.shape:
        raise ValueError(
            f"token_logps and mask must both be [N, T], got {tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    m = mask.bool()
    total = _clean(token_logps, m).sum(dim=-1)
    count = m.sum(dim=-1).clamp(min=1).to(total.dtype)
    return total, total / count


# --------------------------------------------------------------------------- AFT losses


def _pairwise_lse0(scores: Tensor, pairs: Tensor, valid: Tensor, constraint: str, beta: float | Tensor) -> Tensor:
    # One lse0 over every pair of the question (and every boundary term): AFT's form.
    t = pair_terms(_clean(scores, valid), pairs, constraint, beta)
    flat_pairs = pairs.flatten(1)
    terms, masks = [t.margin.flatten(1)], [flat_pairs]
    if t.boundary is not None:
        terms.append(t.boundary.flatten(1))
        masks.append(flat_pairs)
    return lse0(torch.cat(terms, dim=1), torch.cat(masks, dim=1), dim=1)


def _binary(scores: Tensor, positive: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    _check_2d("scores", scores)
    _check_2d("positive", positive, scores.shape)
    v = _valid_mask(scores, valid)
    return binary_pair_mask(positive, v), v


def _ranked(scores: Tensor, ranks: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    _check_2d("scores", scores)
    _check_2d("ranks", ranks, scores.shape)
    v = _valid_mask(scores, valid)
    return pair_mask(ranks, v), v


def alignment_loss(scores: Tensor, positive: Tensor, valid: Tensor | None = None) -> Tensor:
    """L_A, alignment without constraint (docs/method.md Eq. 5; the paper's Eq. 6):
    ``L_A = lse0({s_n - s_p : p in G_P, n in G_N})``. Pushes negatives down without limit."""
    pairs, v = _binary(scores, positive, valid)
    return _pairwise_lse0(scores, pairs, v, "none", 0.5)


def detached_constraint_loss(scores: Tensor, positive: Tensor, valid: Tensor | None = None) -> Tensor:
    """DC, detached constraint: ``L_DC = lse0({sg(s_n) - s_p : p in G_P, n in G_N})``.
    Same value as L_A; only positives receive gradient."""
    pairs, v = _binary(scores, positive, valid)
    return _pairwise_lse0(scores, pairs, v, "detach", 0.5)


def boundary_constraint_loss(
    scores: Tensor, positive: Tensor, valid: Tensor | None = None, beta: float | Tensor = 0.5
) -> Tensor:
    """BC, boundary constraint: with ``B = min_p s_p - beta`` and ``T_p = sg(2B - s_p)``,
    ``L_BC = lse0({s_n - s_p : p, n} U {T_p - s_n : p, n})`` over all (positive, negative) pairs.
    A negative is pushed down while above B and pulled up while below it. ``beta > 0`` (nats per
    token; one number, or a ``[B]`` tensor with one margin per question) or ValueError."""
    pairs, v = _binary(scores, positive, valid)
    return _pairwise_lse0(scores, pairs, v, "boundary", beta)


def ranked_alignment_loss(scores: Tensor, ranks: Tensor, valid: Tensor | None = None) -> Tensor:
    """Ranking L_A: ``lse0({s_j - s_i : i better than j})``. Equals L_A for two rank levels."""
    pairs, v = _ranked(scores, ranks, valid)
    return _pairwise_lse0(scores, pairs, v, "none", 0.5)


def ranked_detached_constraint_loss(scores: Tensor, ranks: Tensor, valid: Tensor | None = None) -> Tensor:
    """Ranking DC: ``lse0({sg(s_j) - s_i : i better than j})``: a candidate gets gradient only from
    its better role (the worst level gets none). Equals DC for two rank levels."""
    pairs, v = _ranked(scores, ranks, valid)
    return _pairwise_lse0(scores, pairs, v, "detach", 0.5)


def ranked_boundary_constraint_loss(
    scores: Tensor, ranks: Tensor, valid: Tensor | None = None, beta: float | Tensor = 0.5
) -> Tensor:
    """L_RBC: with ``B_j = min_{i better than j} s_i - beta`` and ``T_ij = sg(2 B_j - s_i)``,
    ``L_RBC = lse0({s_j - s_i : i better than j} U {T_ij - s_j : i better than j})``.
    Equals BC for two rank levels. ``beta > 0`` or ValueError."""
    pairs, v = _ranked(scores, ranks, valid)
    return _pairwise_lse0(scores, pairs, v, "boundary", beta)


# --------------------------------------------------------------------------- baselines


def rrhf_loss(
    scores: Tensor,
    ranks: Tensor,
    valid: Tensor | None = None,
    constraint: str = "none",
    beta: float | Tensor = 0.5,
) -> Tensor:
    """RRHF ranking loss (the paper's formula; the trainer adds NLL of the best candidate):

    ``L = sum_{i better than j} max(0, w_j - s_i) [+ max(0, T_ij - s_j)]``

    with ``w_j = s_j`` ("none", "boundary") or ``sg(s_j)`` ("detach"), and the hinge on the BC term
    ``T_ij - s_j`` (``T_ij = sg(2 B_j - s_i)``, ``B_j = min_{i better than j} s_i - beta``) only for
    "boundary". For one pair the boundary hinge pulls s_j up once it falls below ``s_i - 2 beta``,
    so s_j settles in ``[2 B_j - s_i, s_i]``, a zone centred on B_j. Not normalised by the number of
    pairs.
    """
    pairs, v = _ranked(scores, ranks, valid)
    t = pair_terms(_clean(scores, v), pairs, constraint, beta)
    hinge = torch.relu(t.margin)
    if t.boundary is not None:
        hinge = hinge + torch.relu(t.boundary)
    return torch.where(pairs, hinge, torch.zeros_like(hinge)).sum(dim=(1, 2))


def _listwise(values: Tensor, pairs: Tensor, constraint: str, beta: float | Tensor) -> Tensor:
    # Row i of the pair mask is "all candidates strictly worse than i"; a row with no pairs gives
    # lse0 of an empty set = 0, so candidates without a worse one (and invalid ones) add nothing.
    t = pair_terms(values, pairs, constraint, beta)
    terms, masks = [t.margin], [pairs]
    if t.boundary is not None:
        terms.append(t.boundary)
        masks.append(pairs)
    return lse0(torch.cat(terms, dim=2), torch.cat(masks, dim=2), dim=2).sum(dim=1)


def pro_loss(
    scores: Tensor,
    ranks: Tensor,
    valid: Tensor | None = None,
    constraint: str = "none",
    beta: float | Tensor = 0.5,
) -> Tensor:
    """PRO listwise loss (temperatures 1; the trainer adds the SFT term):

    ``L = sum_k -log(exp(s_k) / (exp(s_k) + sum_{j worse than k} exp(w_j)))
         = sum_k lse0({w_j - s_k : j worse than k} [U {T_kj - s_j : j worse than k}])``

    over candidates k with at least one strictly worse candidate (tied candidates are not each
    other's negatives). ``w_j = sg(s_j)`` for "detach", else ``s_j``; the BC terms
    (``T_kj = sg(2 B_j - s_k)``, ``B_j = min_{i better than j} s_i - beta``) join each softmax's
    denominator for "boundary". Summed over k, not normalised.
    """
    pairs, v = _ranked(scores, ranks, valid)
    return _listwise(_clean(scores, v), pairs, constraint, beta)


def _rewards(
    policy_logps: Tensor,
    reference_logps: Tensor,
    ranks: Tensor,
    valid: Tensor | None,
    beta: float,
) -> tuple[Tensor, Tensor]:
    _check_positive("beta", beta)
    _check_2d("policy_logps", policy_logps)
    _check_2d("reference_logps", reference_logps, policy_logps.shape)
    _check_2d("ranks", ranks, policy_logps.shape)
    v = _valid_mask(policy_logps, valid)
    # The reference is frozen: detach so it can never receive gradient.
    diff = _clean(policy_logps, v) - _clean(reference_logps, v).detach()
    return beta * diff, pair_mask(ranks, v)


def dpo_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    ranks: Tensor,
    valid: Tensor | None = None,
    beta: float = 0.1,
    constraint: str = "none",
    boundary: float = 0.5,
) -> Tensor:
    """Pairwise DPO on summed log-probs, averaged over all (better w, worse l) pairs.

    With implicit rewards ``r = beta * (pi - ref)``, per pair
    ``lse0({w_l - r_w} [U {T_wl - r_l}]) = -log sigmoid(r_w - r_l)`` for "none", where
    ``w_l = sg(r_l)`` for "detach" (only the better candidate's policy log-prob moves), and for
    "boundary" ``T_wl = sg(2 B_l - r_w)``, ``B_l = min_{w better than l} r_w - boundary``
    (``boundary`` in reward units): the worse reward is pulled back up below ``B_l``.
    ``beta > 0`` (and ``boundary > 0`` with "boundary") or ValueError.
    """
    rewards, pairs = _rewards(policy_logps, reference_logps, ranks, valid, beta)
    t = pair_terms(rewards, pairs, constraint, boundary)
    stack = [t.margin] if t.boundary is None else [t.margin, t.boundary]
    per_pair = lse0(torch.stack(stack, dim=-1), dim=-1)
    total = torch.where(pairs, per_pair, torch.zeros_like(per_pair)).sum(dim=(1, 2))
    return total / pairs.sum(dim=(1, 2)).clamp(min=1).to(total.dtype)


def dpo_plackett_luce_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    ranks: Tensor,
    valid: Tensor | None = None,
    beta: float = 0.1,
    constraint: str = "none",
    boundary: float = 0.5,
) -> Tensor:
    """Plackett-Luce DPO: PRO's listwise form on the implicit rewards ``r = beta * (pi - ref)``:

    ``L = sum_k -log(exp(r_k) / (exp(r_k) + sum_{j worse than k} exp(w_j)))`` [+ BC terms]

    with ties handled as in PRO (a candidate's denominator holds itself and strictly worse ones) and
    the constraint as in ``dpo_loss`` (``boundary`` in reward units). Summed over k.
    """
    rewards, pairs = _rewards(policy_logps, reference_logps, ranks, valid, beta)
    return _listwise(rewards, pairs, constraint, boundary)
