"""Training methods: each is (which loss, on which scores, with which data). Nothing else differs.

Every method trains on the same candidates file and the same batches; `vft` is the control (the NLL
term alone on the alignment run's NLL batches), `rft` is NLL over references + RFT-deduplicated
correct samples. The objective of every other method is (docs/method.md, Eq. 2)

    L = L_VFT(NLL batch) + lambda * mean_over_questions(L_method(scores of the group's candidates))

For RRHF and PRO the L_VFT term plays the role of their SFT term (the reference is the group's best
candidate); for DPO it is an added NLL term, which the paper's setting shares with every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from aftune import losses


@dataclass
class CandidateBatch:
    """Per-question tensors [B, K] a loss reads: scores of the current model and the feedback.

    `beta` is one number, or a [B] tensor of per-question margins (`beta_auto: gap`)."""

    mean: torch.Tensor  # s(c): length-normalised log-likelihood
    sum: torch.Tensor  # summed log-likelihood (DPO's policy log-prob)
    positive: torch.Tensor
    ranks: torch.Tensor
    valid: torch.Tensor
    ref_logps: torch.Tensor | None = None
    beta: float | torch.Tensor = 0.5
    dpo_beta: float = 0.1


LossFn = Callable[[CandidateBatch], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A training method: `loss` maps a CandidateBatch to one loss per question ([B]); None = NLL only."""

    name: str
    help: str
    loss: LossFn | None = None
    feedback: str = "binary"  # "binary" (positive flags) or "rank"
    needs_reference_logps: bool = False  # DPO family
    uses_beta: bool = False
    nll_data: str = "references"  # "references" | "rft"


def _binary(fn, uses_beta: bool) -> LossFn:
    if uses_beta:
        return lambda b: fn(b.mean, b.positive, b.valid, beta=b.beta)
    return lambda b: fn(b.mean, b.positive, b.valid)


def _ranked(fn, constraint: str | None = None, uses_beta: bool = False) -> LossFn:
    kw = {} if constraint is None else {"constraint": constraint}
    if uses_beta:
        return lambda b: fn(b.mean, b.ranks, b.valid, beta=b.beta, **kw)
    return lambda b: fn(b.mean, b.ranks, b.valid, **kw)


def _dpo(fn, constraint: str = "none") -> LossFn:
    return lambda b: fn(b.sum, b.ref_logps, b.ranks, b.valid, beta=b.dpo_beta, constraint=constraint, boundary=b.beta)


_CONSTRAINT = {"": "none", "-dc": "detach", "-bc": "boundary"}

METHODS: dict[str, Method] = {
    "vft": Method("vft", "control: NLL on the same batches, no alignment term"),
    "rft": Method(
        "rft", "rejection-sampling fine-tuning: NLL on references + distinct correct samples", nll_data="rft"
    ),
    "align": Method(
        "align",
        "L_A: alignment without constraint (ablation; degrades the model)",
        _binary(losses.alignment_loss, False),
    ),
    "dc": Method("dc", "AFT with detached constraint", _binary(losses.detached_constraint_loss, False)),
    "bc": Method(
        "bc", "AFT with boundary constraint (beta)", _binary(losses.boundary_constraint_loss, True), uses_beta=True
    ),
    "rft-dc": Method(
        "rft-dc", "DC on top of RFT's NLL data", _binary(losses.detached_constraint_loss, False), nll_data="rft"
    ),
    "rft-bc": Method(
        "rft-bc",
        "BC on top of RFT's NLL data",
        _binary(losses.boundary_constraint_loss, True),
        uses_beta=True,
        nll_data="rft",
    ),
    "ra": Method(
        "ra", "ranking alignment loss without constraint", _ranked(losses.ranked_alignment_loss), feedback="rank"
    ),
    "rdc": Method(
        "rdc", "ranking AFT, detached constraint", _ranked(losses.ranked_detached_constraint_loss), feedback="rank"
    ),
    "rbc": Method(
        "rbc",
        "ranking AFT, boundary constraint (L_RBC)",
        _ranked(losses.ranked_boundary_constraint_loss, uses_beta=True),
        feedback="rank",
        uses_beta=True,
    ),
}
for _suffix, _c in _CONSTRAINT.items():
    _tag = {"none": "", "detach": " with detached constraint", "boundary": " with boundary constraint"}[_c]
    _bc = _c == "boundary"
    METHODS[f"rrhf{_suffix}"] = Method(
        f"rrhf{_suffix}",
        f"RRHF ranking hinge{_tag}",
        _ranked(losses.rrhf_loss, _c, uses_beta=True),
        feedback="rank",
        uses_beta=_bc,
    )
    METHODS[f"pro{_suffix}"] = Method(
        f"pro{_suffix}",
        f"PRO listwise loss{_tag}",
        _ranked(losses.pro_loss, _c, uses_beta=True),
        feedback="rank",
        uses_beta=_bc,
    )
    METHODS[f"dpo{_suffix}"] = Method(
        f"dpo{_suffix}",
        f"DPO over all (better, worse) pairs{_tag}",
        _dpo(losses.dpo_loss, _c),
        feedback="rank",
        needs_reference_logps=True,
        uses_beta=_bc,
    )
    METHODS[f"dpo-pl{_suffix}"] = Method(
        f"dpo-pl{_suffix}",
        f"DPO Plackett-Luce ranking form{_tag}",
        _dpo(losses.dpo_plackett_luce_loss, _c),
        feedback="rank",
        needs_reference_logps=True,
        uses_beta=_bc,
    )


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
