"""Scaling helpers: LoRA through peft (reference = base with the adapter disabled)."""

from __future__ import annotations


def wrap_lora(model, r: int, alpha: int, targets: list[str]):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # optional extra
        raise ImportError("LoRA needs peft: pip install 'aftune[lora]'") from e
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=[t.strip() for t in targets if t.strip()],
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)
