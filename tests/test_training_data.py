"""The tokenised alignment items: the reference joins each group with a rank that gives ranking losses pairs."""

from __future__ import annotations

import torch
from tiny import char_tokenizer

from aftune import losses
from aftune.records import Candidate, Group
from aftune.training.data import AlignDataset, NLLDataset


def _item(candidates: list[Candidate]):
    tok = char_tokenizer()
    g = Group("1", "arith", "q: 1+1?\n", "1+1=2 #### 2", "2", candidates)
    return AlignDataset(tok, [g], NLLDataset([]), max_candidates=8).items[0]


def test_reference_outranks_samples_when_all_are_wrong():
    # samples ranked among themselves: all wrong, so their dense ranks start at 0
    it = _item([Candidate("#### 3", "3", False, rank=0), Candidate("#### 4", "4", False, rank=1)])
    assert it.is_reference[0] and it.ranks[0] < min(it.ranks[1:])
    pairs = losses.pair_mask(torch.tensor([it.ranks]), torch.ones(1, 3, dtype=torch.bool))
    assert pairs[0, 0].sum() == 2  # the reference is better than both: DPO / RRHF / PRO get pairs


def test_reference_ties_the_best_correct_sample():
    it = _item([Candidate("1+1=2 so #### 2", "2", True, rank=0), Candidate("#### 3", "3", False, rank=2)])
    ref = it.ranks[it.is_reference.index(True)]
    best_correct = min(r for r, p, is_ref in zip(it.ranks, it.positive, it.is_reference) if p and not is_ref)
    assert ref == best_correct and ref < max(it.ranks)
