"""LoRA through peft: for DPO the reference is the base model (= the adapter disabled, no second copy),
only adapter weights train, the adapter is saved and merged into a plain model that `aftune eval` reads."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from test_distributed import _align_cfg, _make_inputs  # noqa: E402  (tests/ is on sys.path under pytest)

torch.set_num_threads(1)


def _base_scores(model, tok, groups, cfg) -> list[list[float]]:
    """Summed log-probs of the candidates `aftune align` selects, under `model` (no cache involved)."""
    from aftune.scoring import score_groups
    from aftune.training.data import AlignDataset, NLLDataset

    ds = AlignDataset(
        tok,
        groups,
        NLLDataset([]),
        max_candidates=cfg.max_candidates,
        include_reference=cfg.include_reference,
        max_response_tokens=cfg.max_response_tokens,
        seed=cfg.seed,
    )
    with torch.no_grad():
        s = score_groups(
            model.eval(), [it.prompt for it in ds.items], [it.candidates for it in ds.items], tok.pad_token_id
        )
    flat, out = s.logp_sum.tolist(), []
    for it in ds.items:
        out.append(flat[: len(it.candidates)])
        flat = flat[len(it.candidates) :]
    return out


def test_lora_dpo_reference_is_base_and_only_adapter_trains(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from aftune.commands.align import run_align
    from aftune.modeling import load_model_and_tokenizer
    from aftune.records import read_groups

    model_dir, cand = _make_inputs(tmp_path)
    cfg = _align_cfg(
        str(model_dir),
        str(cand),
        str(tmp_path / "run"),
        4,
        1,
        max_steps=2,
        lr=1e-2,
        optim="adamw_torch_fused",
        max_grad_norm=1.0,
        lora_r=4,
        lora_alpha=8,
        lora_targets="q_proj,v_proj",
    )
    run_align(cfg)
    out = tmp_path / "run"
    groups = read_groups(cand)
    base, tok = load_model_and_tokenizer(str(model_dir))
    expected = _base_scores(base, tok, groups, cfg)

    # the cached reference == the base model's log-probs
    (cache,) = cand.parent.glob("reflogps-*.json")
    ref = json.loads(cache.read_text())
    flat = lambda v: torch.tensor([x for row in v for x in row])  # noqa: E731
    torch.testing.assert_close(flat(ref), flat(expected), rtol=0, atol=1e-4)

    # trained adapter: disabled -> the base (the reference), enabled -> a different model
    peft_model = PeftModel.from_pretrained(load_model_and_tokenizer(str(model_dir))[0], str(out / "adapter"))
    assert isinstance(peft_model, PeftModel) and not isinstance(base, PeftModel)
    with peft_model.disable_adapter():
        torch.testing.assert_close(flat(_base_scores(peft_model, tok, groups, cfg)), flat(ref), rtol=0, atol=1e-4)
    tuned = flat(_base_scores(peft_model, tok, groups, cfg))
    assert (tuned - flat(ref)).abs().max() > 1e-3

    # the adapter file holds adapter weights only; the merged model differs from the base only in the
    # LoRA targets (q_proj, v_proj): every other weight is bit-identical
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    merged, start = (
        load_file(str(out / "model" / "model.safetensors")),
        load_file(str(model_dir / "model.safetensors")),
    )
    assert merged.keys() == start.keys()
    changed = {k for k in start if not torch.equal(merged[k], start[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    # and the merged model is the trained one
    merged_model = load_model_and_tokenizer(str(out / "model"))[0]
    torch.testing.assert_close(flat(_base_scores(merged_model, tok, groups, cfg)), tuned, rtol=0, atol=1e-4)


def test_lora_sft_with_checkpointing_saves_adapter_and_evaluable_model(tmp_path):
    from aftune.commands.eval import run_eval
    from aftune.commands.sft import run_sft
    from aftune.config import EvalConfig, SFTConfig

    out = tmp_path / "sft"
    run_sft(
        SFTConfig(
            model="tiny",
            out=str(out),
            task="arith",
            task_args="n_train=16,n_validation=4,n_test=4",
            n_train=16,
            n_validation=4,
            batch_size=4,
            max_steps=2,
            eval_steps=2,
            lr=1e-2,
            warmup_ratio=0.0,
            eval_accuracy=False,
            vocab_size=300,
            tiny_hidden=32,
            tiny_layers=1,
            tiny_heads=2,
            max_response_tokens=64,
            quiet=True,
            lora_r=4,
            lora_targets="q_proj,v_proj",
            gradient_checkpointing=True,
        )
    )
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0: it trained
    res = run_eval(
        EvalConfig(
            model=str(out / "model"),
            task="arith",
            task_args="n_train=16,n_validation=4,n_test=4",
            split="test",
            n_questions=2,
            max_new_tokens=4,
            batch_size=2,
            quiet=True,
            out=str(tmp_path / "eval.json"),
        )
    )
    assert res["n"] == 2 and json.loads((tmp_path / "eval.json").read_text())["model"] == str(out / "model")
