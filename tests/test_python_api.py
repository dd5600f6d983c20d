"""aftune from Python, the way TRL's users drive DPOTrainer (docs/python-api.md shows the same code)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import aftune
from aftune import AFTConfig, AFTTrainer, read_groups
from aftune.io import InputError
from aftune.modeling import load_model_and_tokenizer
from aftune.scoring import score_groups


def _args(tmp_path, method: str, **kw) -> AFTConfig:
    return AFTConfig(
        output_dir=str(tmp_path / "out"),
        method=method,
        beta=0.5,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        **kw,
    )


def _unpaired(candidates) -> Dataset:
    """The candidates in TRL's unpaired-preference format: one row per completion, the gold solution among
    them as a desirable one (the tiny model's samples are all wrong)."""
    rows = []
    for g in read_groups(candidates):
        rows.append({"prompt": g.prompt, "completion": g.reference, "label": True})
        rows += [{"prompt": g.prompt, "completion": c.text, "label": c.correct} for c in g.candidates]
    return Dataset.from_list(rows)


def _changed(model, start) -> bool:
    return any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters())


def test_public_names_are_importable():
    for name in aftune.__all__:
        assert getattr(aftune, name) is not None, name
    with pytest.raises(AttributeError):
        aftune.not_a_name  # noqa: B018


@pytest.mark.parametrize("method", ["bc", "dpo"])
def test_trains_on_a_trl_unpaired_dataset(method, tiny_model, candidates, tmp_path):
    ds = _unpaired(candidates)
    assert AFTConfig(output_dir=str(tmp_path)).remove_unused_columns is False  # left at its default below
    trainer = AFTTrainer(model=str(tiny_model), args=_args(tmp_path, method), train_dataset=ds)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    groups = read_groups(candidates)
    assert len(trainer.train_dataset) == len({g.prompt for g in groups})  # rows grouped by prompt
    trainer.train()
    assert trainer.state.global_step == 2 and _changed(trainer.model, start)
    logged = {k for row in trainer.state.log_history for k in row}
    assert {"nll", "align_loss"} <= logged  # both terms ran, so the collator's keys survived


def test_dpo_reference_is_the_start_model(tiny_model, candidates, tmp_path):
    trainer = AFTTrainer(model=str(tiny_model), args=_args(tmp_path, "dpo"), train_dataset=str(candidates))
    trainer.train()  # the reference is scored when training starts, by the prepared model (before any step)
    model, tok = load_model_and_tokenizer(str(tiny_model))
    items = trainer.train_dataset.items[:3]
    with torch.no_grad():
        want = score_groups(model, [it.prompt for it in items], [it.candidates for it in items], tok.pad_token_id)
    got = [x for it in items for x in it.ref_logps]
    torch.testing.assert_close(torch.tensor(got), want.logp_sum, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["bc", "dpo"])
def test_trains_on_a_candidates_file_whatever_remove_unused_columns_says(method, tiny_model, candidates, tmp_path):
    model, tok = load_model_and_tokenizer(str(tiny_model))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = AFTTrainer(
        model=model,
        args=_args(tmp_path, method, remove_unused_columns=True),
        train_dataset=str(candidates),
        processing_class=tok,
    )
    # the reference solution joins each group as a positive (include_reference)
    assert all(it.is_reference[0] for it in trainer.train_dataset.items)
    trainer.train()
    assert _changed(model, start)
    assert "align_loss" in {k for row in trainer.state.log_history for k in row}


def test_lora_through_peft_config(tiny_model, candidates, tmp_path):
    from peft import LoraConfig, PeftModel

    trainer = AFTTrainer(
        model=str(tiny_model),
        args=_args(tmp_path, "bc"),
        train_dataset=str(candidates),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert isinstance(trainer.model, PeftModel)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()


def test_bad_config_and_data_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(InputError, match="field 'beta': must be > 0"):
        AFTConfig(output_dir=str(tmp_path), method="bc", beta=0)
    with pytest.raises(InputError, match="unknown method 'bcc'"):
        AFTConfig(output_dir=str(tmp_path), method="bcc")
    with pytest.raises(InputError, match="takes no per-question beta"):
        AFTConfig(output_dir=str(tmp_path), method="dpo", beta_auto="gap")
    bad = Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(InputError, match="unpaired format"):
        AFTTrainer(model=str(tiny_model), args=_args(tmp_path, "bc"), train_dataset=bad)
    unlabelled = [{"prompt": "p", "completion": "c", "label": "yes"}]
    with pytest.raises(InputError, match="line 1: field 'label': expected bool"):
        AFTTrainer(model=str(tiny_model), args=_args(tmp_path, "bc"), train_dataset=unlabelled)
