"""Tokenised training items: NLL examples (prompt + reference) and candidate groups.

One alignment item = one question's group of candidates + one NLL example drawn from the WHOLE
training set (a seeded permutation), so the VFT term never starves (trial-findings.md) and the
control run (method `vft`) sees exactly the same NLL batches as every alignment run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from aftune.records import Example, Group
from aftune.scoring import encode_pair


class NLLDataset(Dataset):
    """Supervised (prompt, reference) pairs; loss on response tokens only."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]]):
        self.pairs = pairs

    @classmethod
    def from_examples(cls, tokenizer, task, examples: list[Example], max_response_tokens: int | None = None,
                      extra: list[tuple[str, str]] | None = None) -> "NLLDataset":
        texts = [(task.prompt(e), e.reference) for e in examples] + list(extra or [])
        return cls([encode_pair(tokenizer, p, r, max_response_tokens) for p, r in texts])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {"nll": [self.pairs[i]]}


@dataclass
class GroupItem:
    prompt: list[int]
    candidates: list[list[int]]
    positive: list[bool]
    ranks: list[int]
    is_reference: list[bool]
    ref_logps: list[float] | None = None


def select_candidates(group: Group, max_candidates: int, include_reference: bool, rng: random.Random):
    """Pick up to max_candidates: the reference (as a positive, rank 0) first, then positives and
    negatives interleaved, so a capped group keeps both kinds when it has them."""
    cands = list(group.candidates)
    pos = [c for c in cands if c.correct and not c.is_reference]
    neg = [c for c in cands if not c.correct]
    rng.shuffle(pos)
    rng.shuffle(neg)
    chosen = []
    if include_reference:
        from aftune.records import Candidate

        chosen.append(Candidate(text=group.reference, answer=group.answer, correct=True, rank=0, wrong_steps=0,
                                is_reference=True))
    while (pos or neg) and len(chosen) < max_candidates:
        for pool in (pos, neg):
            if pool and len(chosen) < max_candidates:
                chosen.append(pool.pop())
    return chosen


class AlignDataset(Dataset):
    """Item i = group i (candidates tokenised) + NLL example perm[i mod N] of the whole training set."""

    def __init__(self, tokenizer, groups: list[Group], nll: NLLDataset, max_candidates: int = 8,
                 include_reference: bool = True, max_response_tokens: int | None = None, seed: int = 0,
                 nll_per_item: int = 1):
        rng = random.Random(seed)
        self.items: list[GroupItem] = []
        self.groups = groups
        for g in groups:
            chosen = select_candidates(g, max_candidates, include_reference, rng)
            prompt = tokenizer(g.prompt)["input_ids"]
            cands = [encode_pair(tokenizer, g.prompt, c.text, max_response_tokens)[1] for c in chosen]
            ranks = [c.rank if c.rank is not None else (0 if c.correct else 1) for c in chosen]
            if include_reference and len(chosen) > 1:
                ranks[0] = min(ranks)  # the reference is as good as the best candidate
            self.items.append(GroupItem(prompt, cands, [c.correct for c in chosen], ranks,
                                        [c.is_reference for c in chosen]))
        self.nll = nll
        self.nll_per_item = nll_per_item
        self.perm = list(range(len(nll)))
        random.Random(seed + 1).shuffle(self.perm)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        n = len(self.perm)
        nll = [self.nll.pairs[self.perm[(i * self.nll_per_item + j) % n]] for j in range(self.nll_per_item)]
        return {"nll": nll, "group": self.items[i]}


def collate(items: list[dict], pad_id: int) -> dict:
    """NLL pairs -> padded tensors (labels -100 on prompt and padding); groups stay Python lists
    (scoring pads them itself, prompt once per group)."""
    pairs = [p for it in items for p in it["nll"]]
    batch: dict = {}
    if pairs:
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (p, r) in enumerate(pairs):
            seq = p + r
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(r)
            mask[i, :len(seq)] = 1
        batch["nll"] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    groups = [it["group"] for it in items if "group" in it]
    if groups:
        batch["groups"] = groups
    return batch
