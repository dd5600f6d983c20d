"""Multiple-choice answers (AQuA, ECQA): prompt format, letter extraction and grading.

Extraction, in order of trust:
- strict: only an explicit marker (`The answer is`, `####`, any case) followed by an option letter
  (`C`, `(C)`, `C)`, `option C`, `**C**`) or by an option's text; the LAST marker that yields an
  answer wins.
- flexible (the default): the strict answer if there is one; otherwise the last option letter in
  an answer-like context (`(C)`, `C)`, `answer: C`, `option c`, `**C**`, `D is the answer`, a line
  holding just `C`, an uppercase letter as the completion's last token), unless the completion's
  last sentence names exactly one option by its text after that letter (`... in the bedroom.`).
  Bare lowercase letters (`(c)`, `it's b`) count only after a keyword (`answer`, `option`, ...).

Traps handled on purpose (each has a case in tests/corpora):
- a letter inside a word (`Cat`, `A1`) never counts;
- `a`/`A` followed by an ordinary word is the English article (`the answer is a bloody mess`),
  not option A - unless the words after it are option A's own text;
- a repeated option list (`A) 21 B) 6000 C) 600 ...`, three or more consecutive letters) is not an
  answer, so echoing the prompt does not pick `E`;
- several options named in the last sentence (`bedroom, not synagogue`) is ambiguous: no answer,
  rather than a guess (the longest option wins only where one option's text contains another's,
  e.g. `room` inside `dimly lit room`);
- numeric options also match by value (`$1,120.00` names option `1120`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aftune.records import Example
from aftune.tasks.answers import normalize_number, numbers_equal
from aftune.tasks.base import Task

LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E")

# Words that may follow "answer is A" without making the `A` an article.
_CONNECTORS = frozenset(
    {
        "because",
        "since",
        "as",
        "which",
        "so",
        "and",
        "or",
        "with",
        "for",
        "here",
        "is",
        "seems",
        "would",
        "should",
        "must",
        "will",
    }
)

_STRICT_MARKER = re.compile(r"####|\bthe answer is\b", re.IGNORECASE)
_LEAD = re.compile(r"[\s:=*,]*(?:(?:option|choice)\b[\s:]*)?")
_LETTER_AT = re.compile(r"(\*\*)?\s*(\()?([A-Ea-e])(?![A-Za-z0-9']|\.[A-Za-z])(\))?(\*\*)?")

# Flexible contexts; group "l" is the letter.  Lowercase only where a keyword announces it.
_CONTEXTS: tuple[re.Pattern[str], ...] = (
    re.compile(r"\*\*\s*\(?(?P<l>[A-Ea-e])\)?[.:]?\s*\*\*"),  # **C**, **(c)**
    re.compile(r"(?<![A-Za-z0-9])\((?P<l>[A-E])\)"),  # (C)
    re.compile(r"(?<![A-Za-z0-9(])(?P<l>[A-E])\)"),  # C)
    re.compile(
        r"\b(?:answer|ans|option|choice)s?\b"
        r"(?:\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be))?\s*(?:[:=\-\u2013,]\s*)?"
        r"(?:(?:option|choice)\b\s*[:\-]?\s*)?\(?(?P<l>[A-Ea-e])(?![A-Za-z0-9']|\.[A-Za-z])",
        re.IGNORECASE,
    ),  # answer: C / answer is c / option C / correct choice is (C)
    re.compile(
        r"(?<![A-Za-z0-9(])\(?(?P<l>[A-E])\)?\s+is\s+(?:the\s+)?"
        r"(?:correct|right|answer)\b"
    ),  # D is the answer / (C) is correct
    re.compile(r"^[ \t]*\(?(?P<l>[A-E])\)?[.:]?[ \t]*$", re.MULTILINE),  # a line holding only "C"
    re.compile(r"(?<![A-Za-z0-9'.])(?P<l>[A-E])[.!]?\**\s*$"),  # the last token: "So it is B." (not "U.S.A.")
)
_ENUM = re.compile(r"(?<![A-Za-z0-9])\(?([A-E])\)")
_LISTING_GAP = 120  # max characters between the markers of one echoed option list


def normalize_letter(s: str | None) -> str | None:
    """`c`, ` (C) `, `C.` -> `C`; anything else -> None."""
    if not isinstance(s, str):
        return None
    m = re.fullmatch(r"\s*\(?\s*([A-Ea-e])\s*\)?\s*\.?\s*", s)
    return m.group(1).upper() if m else None


def answer_line(letter: str) -> str:
    """The answer line every multiple-choice reference ends with."""
    return f"The answer is {letter}."


def format_options(options: Mapping[str, str]) -> str:
    return "Options: " + " ".join(f"{k}) {v}" for k, v in options.items())


def normalize_text(s: str) -> str:
    """Lowercase, whitespace collapsed: how option texts are compared."""
    return re.sub(r"\s+", " ", s.strip().lower())


def _listing_spans(text: str) -> list[tuple[int, int]]:
    """Spans of echoed option lists: runs of >= 3 enumeration markers with consecutive letters."""
    marks = [(m.start(), m.end(), ord(m.group(1))) for m in _ENUM.finditer(text)]
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(marks):
        j = i
        while (
            j + 1 < len(marks) and marks[j + 1][2] == marks[j][2] + 1 and marks[j + 1][0] - marks[j][1] <= _LISTING_GAP
        ):
            j += 1
        if j - i + 1 >= 3:
            spans.append((marks[i][0], marks[j][1]))
        i = j + 1
    return spans


def _article_ok(text: str, end: int, letter: str, options: Mapping[str, str] | None) -> bool:
    """False when an `a`/`A` ending at text[end] reads as the English article ("a bloody mess")."""
    if letter not in "aA":
        return True
    m = re.match(r"[ \t]+(\S+)", text[end:])
    if m is None:  # end of text or line, or punctuation right after the letter
        return True
    word = m.group(1)
    if not (word[0].isalpha() or word[0] in "\"'\u201c\u2018"):  # "A (bloody mess)", "A - 21"
        return True
    if re.sub(r"\W+$", "", word).lower() in _CONNECTORS:
        return True
    if options and "A" in options:
        return normalize_text(text[end:]).startswith(normalize_text(options["A"]))
    return False


def option_mentions(text: str, options: Mapping[str, str]) -> list[tuple[str, int, int]]:
    """(letter, start, end) for each place `text` names an option by its text or numeric value.

    A mention inside a longer mention of another option is dropped (`room` in `dimly lit room`).
    """
    found: list[tuple[str, int, int]] = []
    low = text.lower()
    for letter, opt in options.items():
        t = normalize_text(opt)
        if not t:
            continue
        pat = r"\s+".join(re.escape(w) for w in t.split(" "))
        # Nothing may extend the match into a longer word or number: `10` is not in `100`, `-10`,
        # `10.5`; `known` is not in `well-known`.
        for m in re.finditer(rf"(?<![\w.\-\u2212]){pat}(?![\w]|[.,]\d)", low):
            found.append((letter, m.start(), m.end()))
    numeric = {k: normalize_number(v) for k, v in options.items()}
    # A value shared by two options (`20%` and `20`) cannot pick one: leave it to the texts.
    shared = {v for v in numeric.values() if v is not None and list(numeric.values()).count(v) > 1}
    numeric = {k: v for k, v in numeric.items() if v is not None and v not in shared}
    if numeric:
        for m in re.finditer(r"(?<![\w.])-?[$€£]?\d[\d,]*(?:\.\d+)?%?", text):
            for letter, value in numeric.items():
                if numbers_equal(m.group(0), value):
                    found.append((letter, m.start(), m.end()))
    return [
        f
        for f in found
        if not any(g[0] != f[0] and g[1] <= f[1] and f[2] <= g[2] and (g[2] - g[1]) > (f[2] - f[1]) for g in found)
    ]


def _unique_mention(text: str, options: Mapping[str, str] | None) -> tuple[str, int] | None:
    """(letter, last position) if `text` names exactly one option, else None (none or ambiguous)."""
    if not options:
        return None
    mentions = option_mentions(text, options)
    letters = {m[0] for m in mentions}
    if len(letters) != 1:
        return None
    return mentions[0][0], max(m[1] for m in mentions)


def _last_sentence(text: str) -> tuple[str, int]:
    """The last non-empty sentence or line of `text` and its offset (decimals do not split)."""
    stripped = text.rstrip()
    cut = 0
    for m in re.finditer(r"[.!?](?=\s)|\n", stripped):
        if stripped[m.end() :].strip():
            cut = m.end()
    return stripped[cut:], cut


def _after_marker(text: str, options: Mapping[str, str] | None) -> str | None:
    """The answer right after an explicit marker (text starts just after the marker)."""
    # The lead may cross a line break: "The answer is:\n(C) bedroom".
    start = _LEAD.match(text).end()
    line = text[start:].split("\n", 1)[0]
    m = _LETTER_AT.match(line)
    if m is not None:
        letter = m.group(3)
        boxed = bool(m.group(1) or m.group(2) or m.group(4))
        if boxed or _article_ok(line, m.end(3), letter, options):
            return letter.upper()
    hit = _unique_mention(line, options)
    return hit[0] if hit else None


def extract_choice(completion: str, strict: bool = False, options: Mapping[str, str] | None = None) -> str | None:
    """The option letter a completion commits to, or None (rules: module doc).

    `options` maps letters to option texts; without it, only letters are recognised.
    """
    if not isinstance(completion, str) or not completion.strip():
        return None
    for m in reversed(list(_STRICT_MARKER.finditer(completion))):
        got = _after_marker(completion[m.end() :], options)
        if got is not None:
            return got
    if strict:
        return None

    listings = _listing_spans(completion)
    best: tuple[int, str] | None = None
    for pat in _CONTEXTS:
        for m in pat.finditer(completion):
            start = m.start("l")
            if any(a <= start < b for a, b in listings):
                continue
            letter = m.group("l")
            if not _article_ok(completion, m.end("l"), letter, options):
                continue
            if best is None or start > best[0]:
                best = (start, letter.upper())

    tail, offset = _last_sentence(completion)
    hit = _unique_mention(tail, options)
    if hit is not None and (best is None or offset + hit[1] > best[0]):
        return hit[0]
    return best[1] if best else None


class MultipleChoiceTask(Task):
    """Grading shared by the five-option tasks; `Example.options` maps letters to option texts."""

    def option_block(self, example: Example) -> str:
        return format_options(example.options or {})

    def zero_shot_prompt(self, example: Example) -> str:
        return f"Question: {example.question}\n{self.option_block(example)}\nAnswer:\n"

    def extract_answer(self, completion: str, example: Example | None = None, strict: bool = False) -> str | None:
        # With the example, an answer given by option text ("so it is 0.26") maps to its letter.
        return extract_choice(completion, strict=strict, options=example.options if example is not None else None)

    def answers_match(self, predicted: str | None, gold: str) -> bool:
        p, g = normalize_letter(predicted), normalize_letter(gold)
        return p is not None and p == g
