"""The tokenised alignment items: the reference joins each group with a rank that gives ranking losses pairs."""

from __future__ import annotations

import pytest
import torch
from tiny import char_tokenizer, tiny_llama

from aftune import AFTConfig, AFTTrainer, losses
from aftune.io import InputError
from aftune.modeling import ensure_pad_token
from aftune.records import Candidate, Group
from aftune.training.data import AlignDataset, NLLDataset, collate


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


def _padless():
    tok = char_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id == 1
    return tok


def test_a_tokenizer_without_pad_gets_eos_once_for_every_entry_point():
    tok = ensure_pad_token(_padless())
    assert (tok.pad_token, tok.pad_token_id) == ("</s>", 1)
    tok = _padless()
    tok.eos_token = None
    with pytest.raises(InputError, match="field 'processing_class': the tokenizer has no pad token and no EOS"):
        ensure_pad_token(tok)


def test_collate_refuses_a_missing_pad_id_clearly():
    item = {"nll": [([5, 6], [7])]}
    with pytest.raises(ValueError, match="collate needs a pad token id, got None"):
        collate([item], None)


def test_trainer_with_a_padless_tokenizer_pads_with_eos_and_trains(tmp_path):
    tok = _padless()
    model = tiny_llama(char_tokenizer())
    groups = [
        Group(str(i), "arith", f"q: {i}+1?\n", f"{i}+1={i + 1} #### {i + 1}", str(i + 1), cands)
        for i, cands in enumerate(
            [
                [Candidate("1+1=2 #### 2", "2", True), Candidate("1+1=3 #### 3", "3", False)],
                [Candidate("2+1=4 #### 4", "4", False), Candidate("2+1=3 #### 3", "3", True)],
            ]
        )
    ]
    args = AFTConfig(
        output_dir=str(tmp_path),
        method="bc",
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = AFTTrainer(model=model, processing_class=tok, args=args, train_dataset=groups)
    assert tok.pad_token_id == tok.eos_token_id == 1
    # rows of unequal length: the shorter is padded with EOS, and padding is masked out of the labels
    batch = trainer.data_collator([{"nll": [([5, 6], [7, 8, 9])]}, {"nll": [([5], [7])]}])["nll"]
    assert batch["input_ids"][1].tolist() == [5, 7, 1, 1, 1] and batch["labels"][1].tolist() == [
        -100,
        7,
        -100,
        -100,
        -100,
    ]
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
