"""The sampler's draw: an inverse CDF on one hashed uniform per row (sampler._draw, keyed_uniform, pick)."""

from __future__ import annotations

import pytest
import torch

from aftune.sampling import sampler
from aftune.sampling.sampler import SamplingConfig, _draw, _mul32, keyed, keyed_uniform, pick, row_key, shared_uniform

M32 = (1 << 32) - 1


def test_mul32_is_exact_multiplication_mod_2_32():
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, M32, 0xDEADBEEF, 12345]
    xs += torch.randint(0, 1 << 32, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    for c in (0x21F0AAAD, 0x735A2D97, M32, 1, 0x10000):
        got = _mul32(torch.tensor(xs), c).tolist()
        assert got == [(x * c) & M32 for x in xs]


def test_keyed_uniform_depends_only_on_key_and_step():
    keys = torch.tensor([row_key(q, j) for q in range(50) for j in range(4)])
    steps = torch.arange(len(keys)) % 7
    u = keyed_uniform(keys, steps)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(1))
    assert torch.equal(keyed_uniform(keys[perm], steps[perm]), u[perm])  # any company, any order
    assert torch.equal(keyed_uniform(keys[3:4], steps[3:4]), u[3:4])
    assert len(set(u.tolist())) == len(u)
    # neighbouring keys / steps give unrelated values: no two rows of one question, no two steps of a row agree
    one_row = keyed_uniform(torch.full((1000,), keys[0].item()), torch.arange(1000))
    assert len(set(one_row.tolist())) == 1000


def test_keyed_uniform_is_uniform_and_unpaired():
    """200k (key, step) pairs: 64 equal bins pass a chi-square test, and consecutive steps are uncorrelated."""
    keys = torch.tensor([row_key(q, j) for q in range(2500) for j in range(8)]).repeat_interleave(10)
    steps = torch.arange(10).repeat(20000)
    u = keyed_uniform(keys, steps)
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    expected = len(u) / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 110.0  # 63 degrees of freedom: P(chi2 > 110) ~ 2e-4
    pairs = u.view(-1, 10)
    r = torch.corrcoef(torch.stack([pairs[:, :-1].flatten(), pairs[:, 1:].flatten()]))[0, 1]
    assert abs(float(r)) < 0.01


def _reference_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One float64 cumsum over the whole row: the draw _draw's two levels must reproduce."""
    cum = probs.double().cumsum(-1)
    i = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    last = torch.where(probs > 0, torch.arange(probs.shape[1]), -1).amax(-1)
    return torch.minimum(i, last)


@pytest.mark.parametrize("block", [4, 512])
def test_draw_frequencies_match_the_probabilities(monkeypatch, block):
    """Exact frequency check over 120k keyed rows on a 10-token vocabulary with zeros (blocks of 4: a partial
    last block, a block of zeros); chi-square over the tokens with mass, none drawn of those without."""
    monkeypatch.setattr(sampler, "DRAW_BLOCK", block)
    p = torch.tensor([0.05, 0.0, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.4, 0.25])
    n = 120_000
    keys = torch.tensor([row_key(7, j) for j in range(n)])
    tok = _draw(p.expand(n, -1).clone(), keyed_uniform(keys, torch.zeros(n, dtype=torch.long)))
    counts = torch.bincount(tok, minlength=10).double()
    assert counts[p == 0].sum() == 0
    mass = p > 0
    expected = n * p[mass].double() / p.sum()
    chi2 = float(((counts[mass] - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 4 degrees of freedom: P(chi2 > 20.5) ~ 4e-4


@pytest.mark.parametrize("block", [3, 4, 512])
def test_zero_probability_never_drawn_even_at_the_edges(monkeypatch, block):
    """u = 0, the largest u < 1, and u landing exactly on a cumulative boundary: a token of probability 0 is never
    chosen, and every draw is the one-level float64 inverse CDF's, except where u lies within float32 rounding of a
    boundary (the block sums are float32: there either neighbour may win, both with mass)."""
    monkeypatch.setattr(sampler, "DRAW_BLOCK", block)
    rows = torch.tensor(
        [
            [0.0, 0.25, 0.0, 0.25, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0],  # trailing zeros: a whole zero block
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # one token at the very end
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # one token at the start
            [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # float rounding of the cumulative sums
            [0.0, 3e-30, 0.0, 0.0, 2.0, 0.0, 0.0, 1e-30, 0.0, 0.0],  # unnormalised, tiny masses
        ]
    )
    edge = [0.0, 1.0 - 2.0**-53, 0.25, 0.5, 0.75, 0.1, 0.3, 0.9, 0.99999999, 1e-31]
    for uval in edge:
        u = torch.full((len(rows),), uval, dtype=torch.float64)
        got = _draw(rows.clone(), u)
        assert bool((rows.gather(1, got.unsqueeze(1)) > 0).all()), uval
        cdf = rows.double().cumsum(-1) / rows.double().sum(-1, keepdim=True)
        on_boundary = ((cdf - uval).abs() < 1e-6).any(-1)
        ref = _reference_draw(rows, u)
        assert torch.equal(got[~on_boundary], ref[~on_boundary]), uval
    # a boundary belongs to the token after it (half-open intervals): u = 0.25 of row 0 is token 3, not 1 or 2
    assert _draw(rows[:1].clone(), torch.tensor([0.25], dtype=torch.float64)).item() == 3


def test_draw_agrees_with_one_level_cdf_at_a_large_vocabulary():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(64, 50_000, generator=g) * 4, -1)
    probs[:, ::3] = 0.0  # zeros spread through every block
    u = torch.rand(64, generator=g, dtype=torch.float64)
    assert torch.equal(_draw(probs.clone(), u), _reference_draw(probs, u))


def test_top_p_keeps_every_token_tied_with_the_last_kept_one():
    """Two tokens of equal probability straddle the top_p mass: both stay (a sort's tie order decides nothing), the
    rest never appear."""
    logits = torch.tensor([[2.0, 1.0, 1.0, -1.0, -1.0, -3.0]]).log_softmax(-1)
    p = logits.exp()[0]
    top_p = float(p[0] + 0.5 * p[1])  # the mass is reached inside the tie
    n = 4000
    cfg = SamplingConfig(temperature=1.0, top_p=top_p)
    keys = torch.tensor([row_key(11, j) for j in range(n)])
    tok = pick(logits.expand(n, -1).clone(), cfg, keyed(keys, torch.zeros(n, dtype=torch.long)))
    drawn = set(tok.tolist())
    assert drawn == {0, 1, 2}


def test_greedy_draws_nothing():
    def never(n, device):
        raise AssertionError("greedy decoding must not draw")

    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pick(logits, SamplingConfig(temperature=0.0), never), logits.argmax(-1))


def test_shared_uniform_is_deterministic_for_the_generator():
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=1.0)
    a = pick(logits, cfg, shared_uniform(torch.Generator().manual_seed(5)))
    b = pick(logits, cfg, shared_uniform(torch.Generator().manual_seed(5)))
    c = pick(logits, cfg, shared_uniform(torch.Generator().manual_seed(6)))
    assert torch.equal(a, b) and not torch.equal(a, c)
