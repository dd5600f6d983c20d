"""Install a trained testbed base into the package: `python scripts/ship_base.py RUN_DIR [NAME]`.

RUN_DIR is the `out` of `aftune sft --config configs/testbed/arith-base.yaml`. Copies the model's
safetensors weights, configs and tokenizer (no pickles: not training_args.bin) and the run's config.yaml into
src/aftune/assets/NAME/, and writes a model card with the recipe, the eval-loss curve and the weights' sha256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def main(run: str, name: str = "arith-base") -> Path:
    run_dir = Path(run)
    dest = Path(__file__).resolve().parents[1] / "src" / "aftune" / "assets" / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(run_dir / "model" / f, dest / f)
    shutil.copyfile(run_dir / "config.yaml", dest / "recipe.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evals = [(h["step"], h["eval_loss"]) for h in metrics["log_history"] if "eval_loss" in h]
    sha = hashlib.sha256((dest / "model.safetensors").read_bytes()).hexdigest()
    cfg = json.loads((dest / "config.json").read_text())
    n_params = cfg["vocab_size"] * cfg["hidden_size"] + cfg["num_hidden_layers"] * (
        4 * cfg["hidden_size"] ** 2 + 3 * cfg["hidden_size"] * cfg["intermediate_size"] + 2 * cfg["hidden_size"]
    )
    curve = "\n".join(f"| {s} | {loss:.4f} |" for s, loss in evals)
    (dest / "README.md").write_text(
        f"""# {name}: the testbed's pretrained base

A {n_params / 1e6:.2f}M-parameter Llama ({cfg["num_hidden_layers"]} layers, hidden {cfg["hidden_size"]}, \
{cfg["num_attention_heads"]} heads, vocabulary {cfg["vocab_size"]}, tied embeddings) trained from scratch by
`aftune sft --config configs/testbed/arith-base.yaml` (the exact settings are in `recipe.yaml`), then installed with
`python scripts/ship_base.py`. Load it anywhere with `--model {name}` (or `AutoModelForCausalLM.from_pretrained` on
this folder).

What it saw: 1-2-step `arith` word problems with worked solutions (data seed 1000, numbers up to 20, every value
at most 200), four per document. What it did not see: the testbed's 3-4-step problems; VFT teaches those from a
few hundred labelled examples (docs/results.md, "The testbed").

Training: {metrics["steps"]} steps in {metrics["train_seconds"]:.0f} s. Held-out loss per token (100 documents):

| step | eval loss |
|---|---|
{curve}

`model.safetensors` sha256: `{sha}`
"""
    )
    print(f"installed {run_dir} as {dest} (sha256 {sha[:12]})")
    return dest


if __name__ == "__main__":
    main(*sys.argv[1:])
