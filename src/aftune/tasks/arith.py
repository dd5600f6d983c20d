"""`arith`: seeded multi-step arithmetic word problems in GSM8K's shape, with many valid solutions.

A problem is a person's stock of one item changed by a list of signed terms (a literal or a
product "a bags of b"), optionally followed by a final `* k` (price) or `/ k` (equal shares).
Every solution line performs exactly one binary operation with a calculator annotation, so every
valid solution has `meta["steps"]` annotations, and ends with `#### N`.

`sample_solution(problem, rng)` draws one of many valid paths: operand order of `+`/`*`, the order
of independent steps (which product first, products early or just in time), the grouping of the
signed terms (apply them one by one, or first add gains together / losses together), and 2-4
phrasings per line.  The reference is one such draw, so sampled correct solutions are not mere
copies of it.  All intermediate values are non-negative integers.
"""

from __future__ import annotations

import random
from typing import Any

from aftune.records import Example
from aftune.tasks.answers import extract_number, numbers_equal
from aftune.tasks.base import Task

NAMES = (
    ("Ann", "she", "her"),
    ("Mia", "she", "her"),
    ("Lily", "she", "her"),
    ("Ben", "he", "him"),
    ("Sam", "he", "him"),
    ("Tom", "he", "him"),
)
ITEMS = ("apples", "eggs", "cards", "pens", "stickers", "marbles")
CONTAINERS = ("bags", "boxes", "packs")
MAX_ATTEMPTS = 200  # rejection-sampling tries per problem before giving up on a draw
MAX_VALUE = 1000  # default bound on every intermediate value of every solution path (keeps numbers moderate)


# ---------------------------------------------------------------- problem generation


def _term_text(t: dict[str, Any], p: dict[str, Any]) -> str:
    """Question sentence for one term."""
    amount = f"{t['a']} {t['container']} of {t['b']} {p['item']}" if t["kind"] == "mul" else f"{t['a']} {p['item']}"
    return f"{t['act']} {amount}."


def _value(t: dict[str, Any]) -> int:
    return t["a"] * t["b"] if t["kind"] == "mul" else t["a"]


def _act(sign: int, p: dict[str, Any], rng: random.Random, first: bool) -> str:
    """The verb phrase of a term, fixed at generation time (question and solution share it)."""
    subj = p["name"] if first else p["pron"].capitalize()
    if first:
        return rng.choice((f"{subj} has", f"{subj} starts with"))
    if sign > 0:
        return rng.choice((f"{subj} buys", f"{p['friend']} gives {p['obj']}", f"{subj} finds"))
    return rng.choice((f"{subj} sells", f"{subj} gives {p['friend']}", f"{subj} loses"))


def generate_problem(
    rng: random.Random,
    min_steps: int = 2,
    max_steps: int = 4,
    max_number: int = 30,
    ops: str = "+-*",
    max_value: int = MAX_VALUE,
) -> dict[str, Any]:
    """One random problem as a JSON-able dict (see module doc); its answer is `problem["answer"]`."""
    lo = 2 if max_number >= 2 else 1
    for _ in range(MAX_ATTEMPTS):
        steps = rng.randint(min_steps, max_steps)
        finals = [o for o in "*/" if o in ops]
        final_op = rng.choice(finals) if finals and steps >= 1 and rng.random() < 0.4 else None
        rest = steps - (final_op is not None)
        n_mul = rng.randint(0, min((rest + 1) // 2, 2)) if "*" in ops else 0
        n_terms = rest - n_mul + 1
        name, pron, obj = rng.choice(NAMES)
        friend = rng.choice([n for n, _, _ in NAMES if n != name])
        p: dict[str, Any] = {
            "name": name,
            "pron": pron,
            "obj": obj,
            "friend": friend,
            "item": rng.choice(ITEMS),
            "terms": [],
            "final": None,
        }
        containers = rng.sample(CONTAINERS, len(CONTAINERS))
        mul_at = set(rng.sample(range(n_terms), n_mul))
        total = 0
        for i in range(n_terms):
            sign = 1 if i == 0 or "-" not in ops or rng.random() < 0.5 else -1
            if i in mul_at:
                t = {
                    "kind": "mul",
                    "a": rng.randint(lo, max_number),
                    "b": rng.randint(lo, max_number),
                    "container": containers.pop(),
                }
                value = t["a"] * t["b"]
            else:
                t = {"kind": "lit", "a": rng.randint(lo, max_number)}
                value = t["a"]
            if sign < 0 and value >= total:  # keep at least one item after every loss
                if t["kind"] == "lit" and total > lo:
                    t["a"] = value = rng.randint(lo, min(max_number, total - 1))
                else:
                    sign = 1  # ops always holds '+'
            t["sign"] = sign
            t["act"] = _act(sign, p, rng, first=i == 0)
            p["terms"].append(t)
            total += sign * value
        # The largest intermediate of any path is the base after all gains, before any loss.
        if sum(_value(t) for t in p["terms"] if t["sign"] > 0) > max_value:
            continue
        if final_op == "*":
            if total * lo > max_value:
                continue
            p["final"] = {"op": "*", "k": rng.randint(lo, min(max_number, max_value // total))}
            total *= p["final"]["k"]
        elif final_op == "/":
            divisors = [k for k in range(2, max_number + 1) if total % k == 0 and total // k >= 2]
            if not divisors:
                continue
            p["final"] = {"op": "/", "k": rng.choice(divisors)}
            total //= p["final"]["k"]
        p["steps"] = steps
        p["answer"] = total
        p["question"] = _question(p, rng)
        return p
    raise ValueError(
        f"could not generate a problem with steps {min_steps}-{max_steps}, max_number={max_number}, ops={ops!r}, "
        f"max_value={max_value}"
    )


def _question(p: dict[str, Any], rng: random.Random) -> str:
    parts = [_term_text(t, p) for t in p["terms"]]
    name, item = p["name"], p["item"]
    f = p["final"]
    if f is None:
        ask = rng.choice((f"How many {item} does {name} have now?", f"How many {item} does {name} have left?"))
    elif f["op"] == "*":
        parts.append(f"Each one costs {f['k']} dollars.")
        ask = rng.choice((f"How many dollars are {name}'s {item} worth?", f"What are the {item} worth in dollars?"))
    else:
        parts.append(f"{p['pron'].capitalize()} shares them equally among {f['k']} friends.")
        ask = rng.choice((f"How many {item} does each friend get?", f"How many {item} go to each friend?"))
    return " ".join(parts + [ask])


# ---------------------------------------------------------------- solution paths


def _eq(x: int, op: str, y: int, r: int) -> str:
    return f"{x} {op} {y} = <<{x}{op}{y}={r}>>{r}"


def _commute(x: int, y: int, rng: random.Random) -> tuple[int, int]:
    return (y, x) if rng.random() < 0.5 else (x, y)


def sample_solution(problem: dict[str, Any], rng: random.Random) -> str:
    """One valid step-by-step solution, drawn at random among many (see module doc)."""
    p = problem
    P, item = p["pron"].capitalize(), p["item"]
    lines: list[str] = []
    # Groups: [sign, value, is_base]; products must be computed before their term joins a group.
    pending_mul = {i for i, t in enumerate(p["terms"]) if t["kind"] == "mul"}
    ready: dict[int, list] = {i: [t["sign"], t["a"], i == 0] for i, t in enumerate(p["terms"]) if t["kind"] == "lit"}
    eager = rng.random() < 0.5  # compute all products up front, or interleave them

    def do_mul(i: int) -> None:
        t = p["terms"][i]
        x, y = _commute(t["a"], t["b"], rng)
        r = t["a"] * t["b"]
        e = _eq(x, "*", y, r)
        act = t["act"]
        lines.append(
            rng.choice(
                (
                    f"{act} {e} {item}.",
                    f"{t['a']} {t['container']} of {t['b']} is {e} {item}.",
                    f"The {t['container']} hold {e} {item}.",
                    f"{act} {t['a']} {t['container']} of {t['b']}, so {e} {item}.",
                )
            )
        )
        ready[i] = [t["sign"], r, i == 0]
        pending_mul.discard(i)

    while pending_mul or len(ready) > 1:
        moves: list[tuple] = [("mul", i) for i in pending_mul]
        keys = sorted(ready)
        for ai in keys:
            for bi in keys:
                if ai >= bi:
                    continue
                a, b = ready[ai], ready[bi]
                if a[2] or b[2]:
                    base, other = (ai, bi) if a[2] else (bi, ai)
                    if ready[other][0] > 0 or ready[base][1] > ready[other][1]:
                        moves.append(("base", base, other))
                elif a[0] == b[0]:
                    moves.append(("pool", ai, bi))
        if eager and pending_mul:
            moves = [m for m in moves if m[0] == "mul"]
        move = rng.choice(moves)
        if move[0] == "mul":
            do_mul(move[1])
            continue
        _, ai, bi = move
        a, b = ready.pop(ai), ready.pop(bi)
        if move[0] == "base":
            base, other = a, b
            if other[0] > 0:
                x, y = _commute(base[1], other[1], rng)
                r = base[1] + other[1]
                e = _eq(x, "+", y, r)
            else:
                r = base[1] - other[1]
                e = _eq(base[1], "-", other[1], r)
            lines.append(
                rng.choice(
                    (
                        f"Now {p['pron']} has {e} {item}.",
                        f"{P} then has {e} {item}.",
                        f"That leaves {e} {item}." if other[0] < 0 else f"That makes {e} {item}.",
                    )
                )
            )
            ready[min(ai, bi)] = [1, r, True]
        else:
            x, y = _commute(a[1], b[1], rng)
            r = a[1] + b[1]
            e = _eq(x, "+", y, r)
            if a[0] > 0:
                lines.append(
                    rng.choice(
                        (
                            f"In all {p['pron']} gets {e} more {item}.",
                            f"{P} gains {e} {item} in total.",
                            f"Together that is {e} more {item}.",
                        )
                    )
                )
            else:
                lines.append(
                    rng.choice(
                        (
                            f"In all {p['pron']} loses {e} {item}.",
                            f"{P} parts with {e} {item} in total.",
                            f"Together {e} {item} go.",
                        )
                    )
                )
            ready[min(ai, bi)] = [a[0], r, False]
    total = next(iter(ready.values()))[1]
    f = p["final"]
    if f is not None and f["op"] == "*":
        x, y = _commute(total, f["k"], rng)
        total *= f["k"]
        e = _eq(x, "*", y, total)
        lines.append(
            rng.choice((f"They are worth {e} dollars.", f"That is {e} dollars.", f"So the {item} cost {e} dollars."))
        )
    elif f is not None:
        r = total // f["k"]
        e = _eq(total, "/", f["k"], r)
        total = r
        lines.append(
            rng.choice(
                (
                    f"Each friend gets {e} {item}.",
                    f"That is {e} {item} per friend.",
                    f"So {e} {item} go to each friend.",
                )
            )
        )
    assert total == p["answer"], "solution path disagrees with the problem's answer"
    lines.append(f"#### {total}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the task


class ArithTask(Task):
    """Synthetic GSM8K-shaped arithmetic; splits are deterministic in `seed` and disjoint."""

    name = "arith"
    description = "seeded multi-step arithmetic word problems in GSM8K's format (built in, no data needed)"
    calculator = True  # every line is `a op b = <<a op b=r>>r`: the model chooses a, op, b; arithmetic is exact

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 8000,
        n_validation: int = 300,
        n_test: int = 500,
        min_steps: int = 2,
        max_steps: int = 4,
        max_number: int = 30,
        ops: str = "+-*",
        max_value: int = MAX_VALUE,
        per_doc: int = 1,
    ):
        if per_doc < 1:
            raise ValueError(f"per_doc must be >= 1, got {per_doc}")
        # per_doc > 1 makes a pretraining corpus: each train / validation example is a document of per_doc
        # worked problems back to back (the first one's question is the prompt), so the model sees
        # positions as far out as long problems reach; problems may repeat across documents, never with
        # the test split.
        self.per_doc = per_doc
        if not ops or set(ops) - set("+-*/") or "+" not in ops:
            raise ValueError(f"ops must be a subset of '+-*/' containing '+', got {ops!r}")
        if not 1 <= min_steps <= max_steps <= 8:
            raise ValueError(f"need 1 <= min_steps <= max_steps <= 8, got {min_steps}, {max_steps}")
        if max_number < 2:
            raise ValueError(f"max_number must be >= 2, got {max_number}")
        if max_value < 2 * max_number:
            raise ValueError(f"max_value must be >= 2 * max_number, got {max_value} with max_number={max_number}")
        self.max_value = max_value
        self.seed, self.min_steps, self.max_steps, self.max_number, self.ops = (
            seed,
            min_steps,
            max_steps,
            max_number,
            ops,
        )
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self._cache: dict[str, list[Example]] | None = None

    def _build(self) -> dict[str, list[Example]]:
        # Test first, then validation, then train, each excluding what came before, so the
        # evaluation splits do not change when n_train does.
        seen: set[tuple] = set()
        out: dict[str, list[Example]] = {}
        for split in ("test", "validation", "train"):
            rng = random.Random(f"arith-{self.seed}-{split}")
            per = 1 if split == "test" else self.per_doc
            held_out = set(seen)  # a corpus' documents may repeat their own problems, not earlier splits'
            exs: list[Example] = []
            misses = 0
            while len(exs) < self.sizes[split]:
                parts: list[tuple[dict, str]] = []
                while len(parts) < per:
                    p = generate_problem(
                        rng, self.min_steps, self.max_steps, self.max_number, self.ops, self.max_value
                    )
                    key = _structure_key(p)
                    if key in (seen if per == 1 else held_out) or p["question"] in seen:
                        misses += 1
                        if misses > 20 * self.sizes[split] * per + 1000:
                            raise ValueError(f"too few distinct problems for these knobs to fill split '{split}'")
                        continue
                    seen.add(key)
                    seen.add(p["question"])  # type: ignore[arg-type]
                    parts.append((p, sample_solution(p, rng)))
                p, ref = parts[-1] if per == 1 else parts[0]
                if per > 1:
                    ref += "".join(f"\n\nQuestion: {q['question']}\nAnswer:\n{sol}" for q, sol in parts[1:])
                exs.append(
                    Example(
                        id=f"arith-{split}-{len(exs):05d}",
                        question=p["question"],
                        reference=ref,
                        answer=str(p["answer"]),
                        meta={"steps": p["steps"], "problem": p},
                    )
                )
            out[split] = exs
        return out

    def load(self, split: str) -> list[Example]:
        self.check_split(split)
        if self._cache is None:
            self._cache = self._build()
        return list(self._cache[split])

    def extract_answer(self, completion: str, example: Example | None = None, strict: bool = False) -> str | None:
        return extract_number(completion, strict=strict)

    def answers_match(self, predicted: str | None, gold: str) -> bool:
        return numbers_equal(predicted, gold)

    @staticmethod
    def solution_paths(example: Example, n: int, rng: random.Random) -> list[str]:
        """`n` independently drawn valid solutions of `example` (duplicates possible)."""
        return [sample_solution(example.meta["problem"], rng) for _ in range(n)]


def _structure_key(p: dict[str, Any]) -> tuple:
    """A problem's arithmetic, ignoring wording: two questions with the same key are the same problem."""
    terms = tuple((t["sign"], t["kind"], t["a"], t.get("b")) for t in p["terms"])
    f = p["final"]
    return (terms, None if f is None else (f["op"], f["k"]))


__all__ = ["ArithTask", "generate_problem", "sample_solution"]
