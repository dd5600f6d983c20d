"""GSM8K (Cobbe et al. 2021): grade-school math word problems with integer answers.

Local layout: `<data>/gsm8k/{train,test}.jsonl`, records `{question, answer}` where `answer` is the
worked solution ending in `#### N`.  The reference is that solution unchanged (calculator notes
`<<expr=result>>` included, so `wrong_steps` can check them); `Example.answer` is N normalised
(`1,600` -> `1600`).

GSM8K has no validation split: 'validation' is the last 500 records of train.jsonl, and 'train'
excludes them, so the two never overlap.  Ids are `gsm8k-<file>-<0-based record index>`.
"""

from __future__ import annotations

from aftune.io import InputError, require
from aftune.records import Example
from aftune.tasks.answers import DEFAULT_MARKERS, extract_number, normalize_number, numbers_equal
from aftune.tasks.hub import DatasetTask, hub_rows, local_rows

VALIDATION_SIZE = 500
FINAL_MARKER = "\n#### "


def parse_gold(solution: str) -> str | None:
    """The normalised final answer of a GSM8K solution (`... \\n#### 1,600` -> `1600`), or None."""
    if solution.count(FINAL_MARKER) != 1:
        return None
    return normalize_number(solution.split(FINAL_MARKER, 1)[1])


class GSM8KTask(DatasetTask):
    name = "gsm8k"
    description = "GSM8K grade-school math word problems, integer answers after '#### ' (local data or hub)"
    splits = ("train", "validation", "test")

    def load(self, split: str) -> list[Example]:
        self.check_split(split)
        file_split = "test" if split == "test" else "train"
        if self.data_dir is not None:
            source, rows = local_rows(self.local_path(f"gsm8k/{file_split}.jsonl"))
        else:
            source, rows = hub_rows("gsm8k", file_split)
        examples = [self._parse(obj, source, line, f"gsm8k-{file_split}-{i}") for i, (line, obj) in enumerate(rows)]
        if split == "train":
            return examples[:-VALIDATION_SIZE]
        if split == "validation":
            return examples[-VALIDATION_SIZE:]
        return examples

    @staticmethod
    def _parse(obj: dict, source: str, line: int, ex_id: str) -> Example:
        question = require(obj, "question", str, source, line)
        solution = require(obj, "answer", str, source, line)
        gold = parse_gold(solution)
        if gold is None:
            raise InputError("expected exactly one final line '#### <number>'", source, line, "answer")
        return Example(id=ex_id, question=question, reference=solution, answer=gold)

    def extract_answer(self, completion: str, example: Example | None = None, strict: bool = False) -> str | None:
        return extract_number(completion, strict=strict, markers=DEFAULT_MARKERS)

    def answers_match(self, predicted: str | None, gold: str) -> bool:
        return numbers_equal(predicted, gold)
