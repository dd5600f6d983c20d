"""Training data: NLL examples (prompt + reference) and tokenised candidate groups, and the conversions
from what users bring (a candidates file, `Group`s, a TRL-style dataset) into them.

One alignment item = one question's group of candidates + one NLL example drawn from the WHOLE
training set (a seeded permutation), so the VFT term never starves for data and the control run
(method `vft`) sees exactly the same NLL batches as every alignment run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from aftune.io import InputError
from aftune.prompting import encode_prompt
from aftune.records import Candidate, Group, read_groups
from aftune.scoring import encode_pair, pad_sequences
from aftune.tasks.feedback import rft_select

UNPAIRED_COLUMNS = ("prompt", "completion", "label")


class NLLDataset(Dataset):
    """Supervised (prompt ids, response ids) pairs; loss on response tokens only."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]]):
        self.pairs = pairs

    @classmethod
    def from_texts(
        cls,
        tokenizer,
        pairs: Iterable[tuple[str, str]],
        max_response_tokens: int | None = None,
        end: list[int] | None = None,
    ):
        """Tokenise (prompt, response) texts; `end` closes each response (default EOS, see encode_pair)."""
        return cls([encode_pair(tokenizer, p, r, max_response_tokens, end) for p, r in pairs])

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
    ref_logps: list[float] | None = None  # summed log-probs under the frozen start model (DPO, beta_auto)
    beta: float | None = None  # per-question boundary margin (beta_auto: gap); None = the config's beta


def select_candidates(group: Group, max_candidates: int, include_reference: bool, rng: random.Random):
    """Pick up to max_candidates: the reference (as a positive, rank 0; when the group has one) first, then
    positives and negatives interleaved, so a capped group keeps both kinds when it has them."""
    cands = list(group.candidates)
    pos = [c for c in cands if c.correct and not c.is_reference]
    neg = [c for c in cands if not c.correct]
    rng.shuffle(pos)
    rng.shuffle(neg)
    chosen = []
    if include_reference and group.reference:
        chosen.append(
            Candidate(
                text=group.reference, answer=group.answer, correct=True, rank=0, wrong_steps=0, is_reference=True
            )
        )
    while (pos or neg) and len(chosen) < max_candidates:
        for pool in (pos, neg):
            if pool and len(chosen) < max_candidates:
                chosen.append(pool.pop())
    return chosen


class AlignDataset(Dataset):
    """Item i = group i (candidates tokenised) + NLL example perm[i mod N] of the whole training set."""

    def __init__(
        self,
        tokenizer,
        groups: list[Group],
        nll: NLLDataset,
        max_candidates: int = 8,
        include_reference: bool = True,
        max_response_tokens: int | None = None,
        seed: int = 0,
        nll_per_item: int = 1,
        end: list[int] | None = None,
    ):
        rng = random.Random(seed)
        self.items: list[GroupItem] = []
        self.groups = groups
        for g in groups:
            chosen = select_candidates(g, max_candidates, include_reference, rng)
            prompt = encode_prompt(tokenizer, g.prompt)
            cands = [encode_pair(tokenizer, g.prompt, c.text, max_response_tokens, end)[1] for c in chosen]
            ranks = [c.rank if c.rank is not None else (0 if c.correct else 1) for c in chosen]
            if chosen and chosen[0].is_reference and len(chosen) > 1:
                # The reference is as good as the best candidate when some sample is correct (samples rank
                # correct above wrong), and strictly better than every one when all are wrong: the ranks
                # of the samples are dense among themselves, so all-wrong groups start at 0 as well.
                any_correct = any(c.correct for c in chosen[1:])
                ranks[0] = min(ranks[1:]) - (0 if any_correct else 1)
            self.items.append(
                GroupItem(prompt, cands, [c.correct for c in chosen], ranks, [c.is_reference for c in chosen])
            )
        self.nll = nll
        self.nll_per_item = nll_per_item
        self.perm = list(range(len(nll)))
        random.Random(seed + 1).shuffle(self.perm)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        n = len(self.perm)
        nll = (
            [self.nll.pairs[self.perm[(i * self.nll_per_item + j) % n]] for j in range(self.nll_per_item)] if n else []
        )
        return {"nll": nll, "group": self.items[i]}


def collate(items: list[dict], pad_id: int) -> dict:
    """NLL pairs -> padded tensors (labels -100 on prompt and padding); groups stay Python lists
    (scoring pads them itself, prompt once per group)."""
    if pad_id is None:  # a tokenizer without a pad token, past aftune.modeling.ensure_pad_token
        raise ValueError(
            "collate needs a pad token id, got None: the tokenizer has no pad token (set tokenizer.pad_token, "
            "e.g. with aftune.modeling.ensure_pad_token, which uses EOS)"
        )
    pairs = [p for it in items for p in it["nll"]]
    batch: dict = {}
    if pairs:
        ids, mask = pad_sequences([p + r for p, r in pairs], pad_id, left=False)
        labels, _ = pad_sequences([[-100] * len(p) + r for p, r in pairs], -100, left=False)
        batch["nll"] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    groups = [it["group"] for it in items if "group" in it]
    if groups:
        batch["groups"] = groups
    return batch


def rft_pairs(groups: list[Group]) -> list[tuple[str, str]]:
    """RFT's extra NLL data: per question, distinct correct samples (one per equation list)."""
    pairs = []
    for g in groups:
        correct = [c.text for c in g.candidates if c.correct and not c.is_reference]
        pairs += [(g.prompt, t) for t in rft_select(correct, kept=[g.reference] if g.reference else [])]
    return pairs


def default_nll_pairs(groups: list[Group]) -> list[tuple[str, str]]:
    """The NLL term's data when none is given: each group's reference, or its correct candidates when it
    has none (data labelled elsewhere)."""
    pairs = []
    for g in groups:
        if g.reference:
            pairs.append((g.prompt, g.reference))
        else:
            pairs += [(g.prompt, c.text) for c in g.candidates if c.correct]
    return pairs


def groups_from_unpaired(rows: Iterable[dict[str, Any]], task: str = "custom", source: str = "dataset") -> list[Group]:
    """TRL's unpaired-preference format (one row per completion: `prompt`, `completion`, `label`) grouped by
    prompt into aftune's Groups: AFT's binary feedback. Groups keep the order of their first row."""
    by_prompt: dict[str, Group] = {}
    for i, row in enumerate(rows):
        for col in UNPAIRED_COLUMNS:
            if col not in row:
                raise InputError("missing field", source, i + 1, col)
        prompt, completion, label = row["prompt"], row["completion"], row["label"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise InputError(
                "conversational rows (lists of messages) need a chat template; give prompt and completion as text",
                source,
                i + 1,
                "prompt" if not isinstance(prompt, str) else "completion",
            )
        if not isinstance(label, bool):
            raise InputError(f"expected bool, got {type(label).__name__}", source, i + 1, "label")
        g = by_prompt.get(prompt)
        if g is None:
            g = by_prompt[prompt] = Group(id=str(len(by_prompt)), task=task, prompt=prompt, reference="", answer="")
        g.candidates.append(Candidate(text=completion, answer=None, correct=label))
    return list(by_prompt.values())


def to_groups(data: Any, source: str | None = None) -> list[Group]:
    """Groups from what a user passes as training data: a candidates JSONL path, a list of `Group`s, or
    rows (a `datasets.Dataset` or a list of dicts) either in TRL's unpaired format or as candidates records."""
    if isinstance(data, (str, os.PathLike)):
        return read_groups(data)
    if isinstance(data, list) and all(isinstance(g, Group) for g in data):
        return data
    columns = set(getattr(data, "column_names", None) or (data[0].keys() if len(data) else ()))
    where = source or type(data).__name__
    if set(UNPAIRED_COLUMNS) <= columns:
        return groups_from_unpaired(data, source=where)
    if "candidates" in columns:
        return [Group.from_dict(dict(row), where, i + 1) for i, row in enumerate(data)]
    raise InputError(
        f"expected candidates records (id, task, prompt, reference, answer, candidates) or TRL's "
        f"unpaired format ({', '.join(UNPAIRED_COLUMNS)}); got columns {sorted(columns)}",
        where,
    )
