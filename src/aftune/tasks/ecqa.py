"""ECQA (Aggarwal et al. 2021): CommonsenseQA questions with explanation-based chains of thought.

Local layout: `<data>/ecqa/ecqa_{train,val,test}.jsonl` (ECQA's author split joined with
CommonsenseQA; 'validation' = `ecqa_val.jsonl`).  ECQA's own explanations are not in the local data;
the COT is FLAN v2's sentence form of ECQA's positive properties (`cot_positives_flan`).

Reference = COT + `\\nThe answer is X.`.  'train' keeps only examples with a COT (the others are
skipped and counted in a log line: a reference without reasoning is no training target).  In
'validation'/'test' almost no example has a COT, so the reference is then just `The answer is X.`;
those splits are for grading, where only `answer` matters.

From the hub only CommonsenseQA (`tau/commonsense_qa`) is available, without any COT and with
CommonsenseQA's own splits (not ECQA's): 'validation' works (answer-line references), 'train'
raises (no COT to train on) and 'test' raises (its labels are not public).
"""

from __future__ import annotations

import logging
import os

from aftune.io import InputError, require
from aftune.records import Example
from aftune.tasks.choices import LETTERS, MultipleChoiceTask, answer_line
from aftune.tasks.hub import HUB_IDS, DatasetTask, hub_rows, local_rows

log = logging.getLogger(__name__)

_LOCAL_FILES = {"train": "ecqa/ecqa_train.jsonl", "validation": "ecqa/ecqa_val.jsonl", "test": "ecqa/ecqa_test.jsonl"}
COT_FIELD = "cot_positives_flan"


def _parse_choices(raw: object, source: str, line: int) -> dict[str, str]:
    """ECQA `[{"label", "text"} x5]` or hub `{"label": [...], "text": [...]}` -> {"A": text, ...}."""
    if isinstance(raw, dict) and isinstance(raw.get("label"), list) and isinstance(raw.get("text"), list):
        raw = [{"label": lab, "text": txt} for lab, txt in zip(raw["label"], raw["text"])]
    if not isinstance(raw, list) or len(raw) != len(LETTERS):
        raise InputError("expected 5 choices", source, line, "choices")
    out: dict[str, str] = {}
    for want, item in zip(LETTERS, raw):
        if (
            not isinstance(item, dict)
            or item.get("label") != want
            or not isinstance(item.get("text"), str)
            or not item["text"].strip()
        ):
            raise InputError(
                f"choice {want}: expected {{'label': '{want}', 'text': <non-empty str>}}, got {item!r}",
                source,
                line,
                "choices",
            )
        out[want] = item["text"].strip()
    return out


class ECQATask(MultipleChoiceTask, DatasetTask):
    name = "ecqa"
    description = "ECQA: CommonsenseQA with explanation chains of thought, five options A-E (local data)"
    splits = ("train", "validation", "test")

    def __init__(self, data_dir: str | os.PathLike | None = None, n_shot: int = 0):
        DatasetTask.__init__(self, data_dir, n_shot)
        self.skipped_without_cot = 0  # of the last load(), for reports

    def load(self, split: str) -> list[Example]:
        self.check_split(split)
        if self.data_dir is not None:
            source, rows = local_rows(self.local_path(_LOCAL_FILES[split]))
        else:
            hub_id = HUB_IDS["ecqa"][0]
            if split == "train":
                raise InputError(
                    f"ECQA train needs chains of thought, which are not on the hub ({hub_id} "
                    "has questions only); set data_dir or AFTUNE_DATA to a local ECQA copy"
                )
            if split == "test":
                raise InputError(
                    f"the hub test split of {hub_id} has no public labels; use 'validation', "
                    "or set data_dir or AFTUNE_DATA to a local ECQA copy"
                )
            source, rows = hub_rows("ecqa", "validation")
        out: list[Example] = []
        self.skipped_without_cot = 0
        for line, obj in rows:
            ex = self._parse(obj, source, line, split)
            if split == "train" and not ex.meta["has_cot"]:
                self.skipped_without_cot += 1
                continue
            out.append(ex)
        if self.skipped_without_cot:
            log.info(
                "ecqa %s: skipped %d of %d examples without a chain of thought (%s)",
                split,
                self.skipped_without_cot,
                self.skipped_without_cot + len(out),
                source,
            )
        return out

    @staticmethod
    def _parse(obj: dict, source: str, line: int, split: str) -> Example:
        ex_id = require(obj, "id", str, source, line)
        question = require(obj, "question", str, source, line)
        options = _parse_choices(require(obj, "choices", (list, dict), source, line), source, line)
        key = require(obj, "answerKey", str, source, line).strip()
        if key not in LETTERS:
            raise InputError(f"expected one letter A-E, got {key!r}", source, line, "answerKey")
        cot = obj.get(COT_FIELD)
        if cot is not None and not isinstance(cot, str):
            raise InputError(f"expected str or null, got {type(cot).__name__}", source, line, COT_FIELD)
        cot = (cot or "").strip()
        reference = f"{cot}\n{answer_line(key)}" if cot else answer_line(key)
        # ECQA's author split lists some ids in two splits, so ids are qualified by split.
        return Example(
            id=f"ecqa-{split}-{ex_id}",
            question=question,
            reference=reference,
            answer=key,
            options=options,
            meta={"has_cot": bool(cot), "csqa_id": ex_id},
        )
