"""GSM8K's calculator at generation time: once a row has written `<<expr=`, the next tokens are `result>>`.

Cobbe et al. (2021) sampled GSM8K solutions with a calculator that fills in every `<<a*b=` annotation, so
a model's arithmetic is exact and only its reasoning (which quantities, which operation, what order) can
be wrong. `generate_k(..., SamplingConfig(calculator=True))` does the same: the model's own choice of
expression is kept, the value after `=` is computed with `answers.safe_eval` (an exact parser; model text
is never executed) and forced, token by token, through the normal decode loop. A forced token's recorded
log-prob is the model's own log-prob of that token, so a sample's score is that of its final text.
The task decides (`Task.calculator`): on for `arith`, whose every solution line carries an annotation.
"""

from __future__ import annotations

import re
from fractions import Fraction

import torch

from aftune.tasks.answers import safe_eval

# `<<` + an expression with no nested markup + the `=` just written, at the end of the text so far
OPEN_ANNOTATION = re.compile(r"<<([^<>=\n]{1,200})=$")
TAIL_TOKENS = 64  # an annotation's opening lies within this many tokens of its `=`


def format_value(v: Fraction) -> str:
    """GSM8K's style: integers plainly, other values as a short decimal (2.5, 0.3333)."""
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.4f}".rstrip("0").rstrip(".")


class Calculator:
    """Per-row queues of forced token ids, filled when a row opens an annotation and drained one per step."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        # only a token whose text ends in '=' can complete `<<expr=`: the tail is decoded just for those
        self.triggers = torch.tensor([i for i, p in enumerate(pieces) if p and p.endswith("=")], dtype=torch.long)
        self.queue: dict[int, list[int]] = {}  # global row -> token ids still to force
        self.forced = 0

    def override(self, tok: torch.Tensor, rows: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """`tok` (one per cache row) with each live row's next queued token in place of the drawn one."""
        if not self.queue:
            return tok
        tok = tok.clone()
        where = {r: j for j, r in enumerate(rows.tolist())}
        for r in list(self.queue):
            j = where.get(r)
            if j is None or not bool(live[j]):
                continue
            tok[j] = self.queue[r].pop(0)
            self.forced += 1
            if not self.queue[r]:
                del self.queue[r]
        return tok

    def observe(self, tok: torch.Tensor, rows: torch.Tensor, live: torch.Tensor, tokens: torch.Tensor, ends) -> None:
        """After this step's tokens are written: queue `result>>` for every live row that just wrote `<<expr=`.

        tokens: [rows, T] token buffer by global row; ends[j]: how many tokens row rows[j] has now."""
        hit = live & torch.isin(tok, self.triggers.to(tok.device))
        for j in torch.nonzero(hit).flatten().tolist():
            r = int(rows[j])
            if r in self.queue:  # already forcing this row (a forced token never opens an annotation)
                continue
            n = int(ends[j])
            ids = self.forced_after(tokens[r, max(0, n - TAIL_TOKENS) : n].tolist())
            if ids:
                self.queue[r] = ids

    def forced_after(self, tail: list[int]) -> list[int] | None:
        """The ids to force after a row whose last tokens are `tail` (ending in a trigger), or None.

        The one decision both engines make (the vLLM engine calls it from its logits processor)."""
        m = OPEN_ANNOTATION.search(self.tokenizer.decode(tail[-TAIL_TOKENS:], skip_special_tokens=True))
        if m is None:
            return None
        value = safe_eval(m.group(1))
        if value is None:  # not an expression: let the model go on by itself
            return None
        return self.tokenizer.encode(format_value(value) + ">>", add_special_tokens=False) or None


__all__ = ["Calculator", "format_value"]
