"""AQuA-RAT (Ling et al. 2017): algebra word problems, five options, natural-language rationales.

Local layout (`<data>/aqua/`): 'validation' = `dev.jsonl`, 'test' = `test.jsonl` (original AQuA
records `{question, options ["A)21", ...], rationale, correct}`), and 'train' =
`flan_cot/aqua_train_flan.jsonl`: the official train file is not in the local data, so train is
FLAN v2's 2,728-problem subset of it (options `"(A) 300"`).  From the hub (`deepmind/aqua_rat`,
config `raw`) 'train' is the full original train split (97,467 problems).

Reference = rationale without its free-form closing answer line (`ANSWER:B`, `Answer is A.`,
`Correct option: C`, ...; only when a whole last line is such a statement and names the gold
letter) + `\\nThe answer is X.`.  Rationales whose last line is not recognised keep it: the appended
line comes last, so grading still reads X.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from aftune.io import InputError, require
from aftune.records import Example
from aftune.tasks.choices import LETTERS, MultipleChoiceTask, answer_line, normalize_text
from aftune.tasks.hub import DatasetTask, hub_rows, local_rows

_LOCAL_FILES = {
    "train": "aqua/flan_cot/aqua_train_flan.jsonl",
    "validation": "aqua/dev.jsonl",
    "test": "aqua/test.jsonl",
}
_HUB_SPLITS = {"train": "train", "validation": "validation", "test": "test"}

_OPTION = re.compile(r"^\s*\(?([A-E])\)\s*(.*?)\s*$", re.DOTALL)

_PREFIX = r"(?:(?:so|thus|hence|therefore)\s*,?\s+)?"
# "ANSWER:B", "The correct answer is (D).", "Answer: Option C", "correct option is C", "Choice B."
_CLOSING_KEYWORD = re.compile(
    rf"^{_PREFIX}(?:the\s+)?(?:correct\s+|right\s+|final\s+)?(?:answer|ans|option|choice)"
    r"(?:\s+(?:is|will\s+be|should\s+be|would\s+be))?\s*[:=\-.,]?\s*(?:(?:option|choice)\s*:?\s*)?"
    r"\(?(?P<l>[A-E])\b\)?(?P<rest>.*)$",
    re.IGNORECASE,
)
# "D is the answer", "Hence (C) is the correct answer", "Option B is correct"
_CLOSING_IS = re.compile(
    rf"^{_PREFIX}(?:(?:option|choice)\s+)?\(?(?P<l>[A-E])\)?\s+is\s+(?:the\s+)?(?:correct|right)?\s*"
    r"(?:answer|option|choice)?\s*[.!]?$",
    re.IGNORECASE,
)
_BARE = re.compile(r"^\(?(?P<l>[A-E])\)?[.)]?$")


def parse_options(raw: object, source: str, line: int) -> dict[str, str]:
    """`["A)21", ...]` or `["(A) 300", ...]` -> {"A": "21", ...}; exactly A-E in order."""
    if not isinstance(raw, list) or len(raw) != len(LETTERS):
        raise InputError("expected a list of 5 options", source, line, "options")
    out: dict[str, str] = {}
    for want, item in zip(LETTERS, raw):
        m = _OPTION.match(item) if isinstance(item, str) else None
        if m is None or m.group(1) != want or not m.group(2):
            raise InputError(f"option {want}: expected '{want})<text>', got {item!r}", source, line, "options")
        out[want] = m.group(2)
    return out


def closing_letter(line: str, options: Mapping[str, str]) -> str | None:
    """The letter a rationale's closing line states (`Answer: D) 109 rolls` -> D), else None.

    The whole line must be the statement; text after the letter is allowed only when it is that
    option's own text, so a line that also carries working is never taken for a closing line.
    """
    s = line.strip()
    m = _CLOSING_KEYWORD.match(s) or _CLOSING_IS.match(s) or _BARE.match(s)
    if m is None:
        return None
    letter = m.group("l").upper()
    rest = m.groupdict().get("rest") or ""
    rest = re.sub(r"^[\s).:,-]+|[\s.]+$", "", rest)
    rest = re.sub(
        r"^is\s+(?:the\s+)?(?:correct|right)(?:\s+(?:answer|option|choice))?$", "", rest, flags=re.IGNORECASE
    )
    if rest and normalize_text(rest) != normalize_text(options.get(letter, "")):
        return None
    return letter


def build_reference(rationale: str, correct: str, options: Mapping[str, str]) -> tuple[str, bool]:
    """(reference, whether a closing line was dropped)."""
    body = rationale.rstrip()
    lines = body.split("\n")
    dropped = len(lines) > 1 and closing_letter(lines[-1], options) == correct
    if dropped:
        body = "\n".join(lines[:-1]).rstrip()
    return f"{body}\n{answer_line(correct)}", dropped


class AquaTask(MultipleChoiceTask, DatasetTask):
    name = "aqua"
    description = "AQuA-RAT algebra word problems, five options A-E, rationales as chains of thought"
    splits = ("train", "validation", "test")

    def __init__(self, data_dir: str | os.PathLike | None = None, n_shot: int = 0):
        DatasetTask.__init__(self, data_dir, n_shot)
        self.dropped_closing_lines = 0  # of the last load(), for reports

    def load(self, split: str) -> list[Example]:
        self.check_split(split)
        if self.data_dir is not None:
            source, rows = local_rows(self.local_path(_LOCAL_FILES[split]))
        else:
            source, rows = hub_rows("aqua", _HUB_SPLITS[split])
        tag = "flan" if self.data_dir is not None and split == "train" else split
        out = []
        self.dropped_closing_lines = 0
        for i, (line, obj) in enumerate(rows):
            out.append(self._parse(obj, source, line, f"aqua-{tag}-{i}"))
        return out

    def _parse(self, obj: dict, source: str, line: int, ex_id: str) -> Example:
        question = require(obj, "question", str, source, line)
        options = parse_options(require(obj, "options", list, source, line), source, line)
        rationale = require(obj, "rationale", str, source, line)
        correct = require(obj, "correct", str, source, line).strip()
        if correct not in LETTERS:
            raise InputError(f"expected one letter A-E, got {correct!r}", source, line, "correct")
        reference, dropped = build_reference(rationale, correct, options)
        self.dropped_closing_lines += dropped
        return Example(id=ex_id, question=question, reference=reference, answer=correct, options=options)
