"""The task interface: what every dataset knows about its own prompt, stop strings and grading."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from aftune.records import Example
from aftune.tasks.answers import check_annotations


@dataclass(frozen=True)
class Graded:
    """The verdict on one completion: the extracted final answer (None if none) and whether it is right."""

    answer: str | None
    correct: bool


class Task(ABC):
    """A registered reasoning task (lm-eval style: it owns its prompt format, stop strings and grading).

    Subclasses set `name` and implement `load`, `extract_answer` and (if equality of normalised strings is
    not enough) `answers_match`. `grade` is the ONE grading path: sampling labels candidates with it and
    evaluation scores predictions with it, so a completion can never be "correct" in the training labels
    and "wrong" in the reported accuracy. Grading never executes model text.

    Example:
        >>> from aftune import get_task
        >>> task = get_task("arith", n_train=10, n_validation=2, n_test=2)
        >>> ex = task.load("test")[0]
        >>> task.grade(ex.reference, ex).correct
        True
    """

    name: str = "task"
    description: str = ""  # one line for `aftune tasks`
    splits: tuple[str, ...] = ("train", "validation", "test")
    # A model that keeps writing after its answer would start a new question: sampling and eval cut there.
    stop: tuple[str, ...] = ("\nQuestion:",)
    # Fill in `<<expr=` calculator annotations while generating (aftune.sampling.calculator), as GSM8K's
    # authors sampled: on where every solution line carries one.
    calculator: bool = False

    @abstractmethod
    def load(self, split: str) -> list[Example]:
        """The examples of one split, in a fixed order."""

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"unknown split '{split}'; known: {', '.join(self.splits)}")

    def prompt(self, example: Example) -> str:
        """Zero-shot prompt; the model continues with the solution (the example's `reference`)."""
        return f"Question: {example.question}\nAnswer:\n"

    @abstractmethod
    def extract_answer(self, completion: str, example: Example | None = None, strict: bool = False) -> str | None:
        """The completion's final answer, normalised; None if it gives none. `example` supplies context some
        tasks need (e.g. the option texts of a multiple-choice question); `strict` accepts only the
        canonical answer line."""

    def answers_match(self, predicted: str | None, gold: str) -> bool:
        return predicted is not None and predicted == gold

    def grade(self, completion: str, example: Example, strict: bool = False) -> Graded:
        answer = self.extract_answer(completion, example, strict=strict)
        return Graded(answer, self.answers_match(answer, example.answer))

    def wrong_steps(self, completion: str) -> int:
        """Number of calculator annotations `<<expr=result>>` whose arithmetic is wrong (0 if none)."""
        return sum(not ok for ok in check_annotations(completion))
