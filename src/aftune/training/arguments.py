"""The method and its hyperparameters, declared once: `AFTConfig` (Python, aftune.training.config) adds them
to `transformers.TrainingArguments`, and `aftune align`'s flags are generated from the same fields
(aftune.config.AlignConfig), so a flag, a YAML key and a Python keyword can never drift apart.

Kept free of torch / transformers imports: the CLI reads these fields before it loads anything heavy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from aftune.io import InputError


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class AlignmentArguments:
    """Which loss and its hyperparameters (see docs/method.md for the formulas)."""

    method: str = _opt(
        "bc", "vft (control) | rft | align | dc | bc | rbc | rrhf | pro | dpo | dpo-pl | ... (see docs)"
    )
    beta: float = _opt(
        0.5,
        "boundary margin of the boundary-constraint methods (bc, rbc, rft-bc, rrhf-bc, pro-bc: nats per token of the "
        "length-normalised scores; dpo-bc, dpo-pl-bc: reward units, dpo_beta x the summed log-ratio to the "
        "reference); with --beta-auto gap: the factor",
    )
    beta_auto: str = _opt("", "'' (one beta) | gap: per-question beta = max(beta_floor, beta x median VFT score gap)")
    beta_floor: float = _opt(0.02, "with --beta-auto gap: the smallest per-question beta")
    lambda_: float = _opt(1.0, "weight of the alignment loss")
    dpo_beta: float = _opt(0.1, "DPO inverse temperature")
    max_candidates: int = _opt(8, "candidates per question per step (reference included)")
    include_reference: bool = _opt(True, "the reference solution joins the positives")
    share_prefix: bool = _opt(True, "compute each prompt once for its k candidates")

    def check_alignment(self, name: Callable[[str], str] = str) -> None:
        """InputError for a bad value; `name` turns a field name into how the user wrote it (e.g. a flag)."""
        from aftune.training.methods import get_method  # methods import losses; config stays light

        try:
            method = get_method(self.method)
        except ValueError as e:
            raise InputError(str(e), field=name("method")) from None
        for key in ("beta", "dpo_beta", "beta_floor"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):  # also rejects NaN
                raise InputError(f"must be > 0, got {value}", field=name(key))
        if not self.lambda_ >= 0:
            raise InputError(f"must be >= 0, got {self.lambda_}", field=name("lambda_"))
        if self.max_candidates < 2:
            raise InputError(
                f"must be >= 2 to have anything to compare, got {self.max_candidates}", field=name("max_candidates")
            )
        if self.beta_auto not in ("", "gap"):
            raise InputError(f"expected '' or 'gap', got {self.beta_auto!r}", field=name("beta_auto"))
        if self.beta_auto and not auto_beta_eligible(method):
            raise InputError(
                f"method '{self.method}' takes no per-question beta (BC-style methods do)", field=name("beta_auto")
            )

    def alignment_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(AlignmentArguments)}


def auto_beta_eligible(method) -> bool:
    """Methods whose beta is a margin on per-token scores (BC terms); DPO's is in reward units."""
    return method.uses_beta and not method.needs_reference_logps and method.loss is not None
