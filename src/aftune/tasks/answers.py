"""Answer extraction, number normalisation and a safe calculator for chain-of-thought text.

Shared by every task.  Nothing here executes model text: numbers go through Decimal/Fraction
and calculator expressions through a small bounded recursive-descent parser (`safe_eval`).

Normalisation rules (`normalize_number`), chosen for GSM8K-style answers:
- accepted: optional sign (`-`, `+`, unicode minus), optional currency (`$`, `€`, `£`, either
  side of the sign), digits with optional *valid* thousands commas (`1,600`, not `1,60`) and an
  optional decimal part, or a bare decimal part (`.5`, as GSM8K annotations write it), optional
  markdown bold (`**73**`);
- dropped: surrounding whitespace, a trailing `%` (GSM8K writes percent answers as plain
  numbers), trailing sentence punctuation (`.`, `,`, `;`, `:`, `!`, `?`), and trailing unit
  words made only of letters (`5 kg`, `5kg`, `29 dollars`);
- rejected (None): anything else, e.g. exponents (`1e3`), fractions (`3/4`), a second number,
  empty or overly long strings.
The canonical form is the shortest plain decimal: `29.00` -> `29`, `2.50` -> `2.5`, `-0` -> `0`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = [
    "normalize_number",
    "extract_number",
    "numbers_equal",
    "to_fraction",
    "safe_eval",
    "parse_annotations",
    "check_annotations",
    "equation_list",
    "DEFAULT_MARKERS",
]

DEFAULT_MARKERS: tuple[str, ...] = ("####", "The answer is", "the answer is")

_MAX_NUMBER_CHARS = 64  # longer "numbers" are garbage, not answers

# One number as it appears in text: sign and currency in either order, thousands groups only
# when well formed (the lookahead stops `1,2345` from matching as `1,234`).
_SIGN = r"[-+\u2212]"
_CUR = r"[$€£]"
_DIGITS = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(rf"(?P<pre>(?:{_SIGN})?(?:{_CUR}\s?)?(?:{_SIGN})?)(?P<num>(?<![\d.]){_DIGITS})")
_FULL_RE = re.compile(
    rf"^(?P<s1>{_SIGN})?\s*(?:{_CUR})?\s*(?P<s2>{_SIGN})?\s*(?P<num>{_DIGITS})\s*%?"
    r"(?:\s*[A-Za-z]+(?:\s+[A-Za-z]+)*)?\s*[.,;:!?]*$"
)


def _canonical(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_number(s: str) -> str | None:
    """Canonical string for a number written by a model or a dataset, or None (rules: module doc)."""
    if not isinstance(s, str):
        return None
    t = s.strip().replace("**", "").strip()
    if not t or len(t) > _MAX_NUMBER_CHARS:
        return None
    m = _FULL_RE.match(t)
    if m is None or (m.group("s1") and m.group("s2")):
        return None
    try:
        value = Decimal(m.group("num").replace(",", ""))
    except InvalidOperation:
        return None
    if (m.group("s1") or m.group("s2") or "") in ("-", "\u2212"):
        value = -value
    return _canonical(value)


def to_fraction(s: str | None) -> Fraction | None:
    """Exact value of a number string (normalised first), or None."""
    if s is None:
        return None
    n = normalize_number(s)
    return None if n is None else Fraction(Decimal(n))


def _match_value(m: re.Match) -> str | None:
    pre = m.group("pre")
    negative = "-" in pre or "\u2212" in pre
    if len(m.group("num")) > _MAX_NUMBER_CHARS:  # garbage, and int() refuses > 4300 digits anyway
        return None
    try:
        value = Decimal(m.group("num").replace(",", ""))
    except InvalidOperation:
        return None
    return _canonical(-value if negative else value)


# A number glued to more number syntax (`3/4`, `1,60`, `1e3`, `12:30`) is only a piece of one,
# which normalize_number would reject as a whole; it must not be extracted as an answer.
_GLUED_AFTER = re.compile(r"[/:,.]\d|[eE][-+]?\d")
_GLUED_BEFORE = re.compile(r"\d(?:[/:,]|[eE][-+]?)$")


def _is_piece(m: re.Match) -> bool:
    start = m.start("num")
    return bool(_GLUED_AFTER.match(m.string, m.end()) or _GLUED_BEFORE.search(m.string, max(0, start - 3), start))


def _numbers(text: str) -> list[re.Match]:
    out = []
    for m in _NUMBER_RE.finditer(text):
        pre = m.group("pre")
        start = m.start()
        # A sign glued to a preceding word/number/closing bracket is an operator (`10-5`), not a sign.
        if pre and pre[0] in "-+\u2212" and start > 0 and (text[start - 1].isalnum() or text[start - 1] in ")]"):
            continue_match = _NUMBER_RE.match(text, start + 1)
            if continue_match is not None:
                out.append(continue_match)
            continue
        out.append(m)
    return [m for m in out if not _is_piece(m)]


def extract_number(text: str, strict: bool = False, markers: tuple[str, ...] = DEFAULT_MARKERS) -> str | None:
    """The final numeric answer in `text`, normalised, or None.

    strict: only the number right after the LAST marker (whitespace, `:`, `=`, `**`, currency and a
    sign may sit in between).  flexible (default): the first number after the last marker if there
    is one, else the last number anywhere in the text.  Units glued on (`5kg`) are ignored.
    """
    if not isinstance(text, str) or not text:
        return None
    pos = -1
    for mk in markers:
        i = text.rfind(mk)
        if i >= 0 and i + len(mk) > pos:
            pos = i + len(mk)
    if pos >= 0:
        tail = text[pos:]
        lead = re.match(r"[\s:=*]*", tail)
        m = _NUMBER_RE.match(tail, lead.end())
        if m is not None and not _is_piece(m):
            return _match_value(m)
        if strict:
            return None
        found = _numbers(tail)
        if found:
            return _match_value(found[0])
    elif strict:
        return None
    found = _numbers(text)
    return _match_value(found[-1]) if found else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Exact equality of two number strings after normalisation (None or garbage never equal)."""
    fa, fb = to_fraction(a), to_fraction(b)
    return fa is not None and fb is not None and fa == fb


# ---------------------------------------------------------------- safe calculator

MAX_EXPR_CHARS = 200
MAX_MAGNITUDE = Fraction(10**15)
MAX_DENOMINATOR = 10**15
MAX_DEPTH = 32
MAX_EXPONENT = 32

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)|(?P<op>\*\*|[-+*/()x×÷X\u2212·]))"
)
_OP_ALIASES = {"x": "*", "X": "*", "×": "*", "·": "*", "÷": "/", "\u2212": "-"}


class _CalcError(Exception):
    pass


def _check(v: Fraction) -> Fraction:
    if abs(v) > MAX_MAGNITUDE or v.denominator > MAX_DENOMINATOR:
        raise _CalcError("out of bounds")
    return v


def _tokenize(expr: str) -> list[tuple[str, object]]:
    tokens: list[tuple[str, object]] = []
    pos, n = 0, len(expr)
    while pos < n:
        if expr[pos:].strip() == "":
            break
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            raise _CalcError(f"bad character at {pos}")
        if m.group("num") is not None:
            tokens.append(("num", _check(Fraction(Decimal(m.group("num").replace(",", ""))))))
        else:
            op = m.group("op")
            tokens.append(("op", _OP_ALIASES.get(op, op)))
        pos = m.end()
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := ('-'|'+') unary | power ; power := atom ('**' unary)? ; atom := NUM | '(' expr ')'.
    Precedence as in Python (so -2**2 = -4 and 2**3**2 = 2**9)."""

    def __init__(self, tokens: list[tuple[str, object]]):
        self.toks, self.i, self.depth = tokens, 0, 0

    def peek(self) -> object:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, object]:
        if self.i >= len(self.toks):
            raise _CalcError("unexpected end")
        t = self.toks[self.i]
        self.i += 1
        return t

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _CalcError("too deep")

    def expr(self) -> Fraction:
        self.enter()
        v = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            rhs = self.term()
            v = _check(v + rhs if op == "+" else v - rhs)
        self.depth -= 1
        return v

    def term(self) -> Fraction:
        v = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()[1]
            rhs = self.unary()
            if op == "*":
                v = _check(v * rhs)
            else:
                if rhs == 0:
                    raise _CalcError("division by zero")
                v = _check(v / rhs)
        return v

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            op = self.take()[1]
            self.enter()
            v = self.unary()
            self.depth -= 1
            return -v if op == "-" else v
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "**":
            return base
        self.take()
        self.enter()
        exp = self.unary()
        self.depth -= 1
        if exp.denominator != 1 or abs(exp) > MAX_EXPONENT:
            raise _CalcError("exponent not a small integer")
        e = int(exp)
        if base == 0 and e < 0:
            raise _CalcError("division by zero")
        # Check the size before computing: |base| <= 1e15 and |e| <= 32 keep this cheap anyway.
        return _check(base**e)

    def atom(self) -> Fraction:
        kind, val = self.take()
        if kind == "num":
            return val  # type: ignore[return-value]
        if val == "(":
            v = self.expr()
            if self.take()[1] != ")":
                raise _CalcError("missing )")
            return v
        raise _CalcError(f"unexpected {val!r}")


def safe_eval(expr: str) -> Fraction | None:
    """Exact value of a calculator expression, or None if it is malformed or out of bounds.

    Supports + - * / ( ), unary signs, decimals, thousands commas, `x`/`×`/`÷` as operators and `**`
    with an integer exponent of at most 32.  Bounds: at most 200 characters, nesting depth 32, and
    every literal and intermediate |v| <= 1e15 with denominator <= 1e15.  Never calls eval.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tokens = _tokenize(expr)
        if not tokens:
            return None
        p = _Parser(tokens)
        v = p.expr()
        if p.i != len(tokens):
            return None
        return v
    except (_CalcError, ZeroDivisionError, InvalidOperation, RecursionError, OverflowError, ValueError):
        return None


# ---------------------------------------------------------------- calculator annotations

_ANNOT_RE = re.compile(r"<<([^<>\n]*)>>")


def parse_annotations(text: str) -> list[tuple[str, str]]:
    """(expression, stated result) for every `<<expr=result>>` in order; without `=` the result is ''."""
    out = []
    for inner in _ANNOT_RE.findall(text or ""):
        if "=" in inner:
            expr, _, result = inner.rpartition("=")
            out.append((expr.strip(), result.strip()))
        else:
            out.append((inner.strip(), ""))
    return out


def _result_matches(value: Fraction, stated: str) -> bool:
    target = to_fraction(stated)
    if target is None:
        return False
    if value == target:
        return True
    # GSM8K writes non-terminating results rounded or truncated to the decimals it shows
    # (`<<10/3=3.33>>`); accept exactly those, never a stated integer for a non-integer value.
    norm = normalize_number(stated) or ""
    places = len(norm.split(".")[1]) if "." in norm else 0
    if places == 0:
        return False
    scale = 10**places
    scaled = abs(value) * scale
    sign = 1 if value >= 0 else -1
    truncated = Fraction(sign * int(scaled), scale)
    rounded = Fraction(sign * int(scaled + Fraction(1, 2)), scale)
    return target in (truncated, rounded)


def check_annotations(text: str) -> list[bool]:
    """For each annotation: True iff its expression evaluates (safe_eval) to its stated result."""
    out = []
    for expr, result in parse_annotations(text):
        value = safe_eval(expr) if "=" not in expr else None
        out.append(value is not None and _result_matches(value, result))
    return out


def equation_list(text: str) -> tuple[str, ...]:
    """The annotations' full `expr=result` strings with whitespace removed (RFT's dedupe key)."""
    return tuple(re.sub(r"\s+", "", inner) for inner in _ANNOT_RE.findall(text or ""))
