"""The task interface: what every dataset knows about its own prompt, answers and grading."""

from __future__ import annotations

from aftune.records import Example


class Task:
    """A registered reasoning task (lm-eval style: it owns its prompt format and its grading).

    Subclasses set `name` and implement `load`, `extract_answer` and `answers_match`.
    Grading never executes model text.
    """

    name: str = "task"
    splits: tuple[str, ...] = ("train", "validation", "test")

    def load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def prompt(self, example: Example) -> str:
        """Zero-shot prompt; the model continues with the solution (the example's `reference`)."""
        return f"Question: {example.question}\nAnswer:\n"

    def extract_answer(self, completion: str, strict: bool = False) -> str | None:
        raise NotImplementedError

    def answers_match(self, predicted: str | None, gold: str) -> bool:
        return predicted is not None and predicted == gold

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.answers_match(self.extract_answer(completion), example.answer)

    def wrong_steps(self, completion: str) -> int:
        """Number of calculator annotations `<<expr=result>>` whose arithmetic is wrong (0 if none)."""
        from aftune.tasks.answers import check_annotations

        return sum(not ok for ok in check_annotations(completion))
