"""MATH-style answers: extract the final answer of a completion and grade it with math-verify, in a sandbox.

What is compared: the *final answer text* of a completion (see `extract_math_answer`) against the gold
answer text, first by a normalised string comparison here, then by math-verify's symbolic comparison
(`math_verify.verify(parse(gold), parse(pred))`, sympy underneath) in a separate worker process.

Why a worker process: model output is hostile input.  math-verify turns some of it into Python source
for `sympy.parsing.sympy_parser.parse_expr`, which ends in the builtin eval (docs/math-grading.md lists
where and why that is not code execution today), and sympy can be made to loop, recurse or allocate
without bound (`9^{9^{9^9}}`, thousands of nested `\\frac`).  math-verify's own timeout is SIGALRM, which
works only in the main thread and cannot stop a crash or a memory blow-up.  So the comparison runs in a
long-lived child process (`python -I` running this file) with an address-space limit, a hard wall-clock
deadline per comparison (the child is killed and replaced when it is missed) and no way to take the
caller down: a timeout, crash, MemoryError or RecursionError in the child grades the answer False.

Normalisation rules (applied to both sides before either comparison):
- dropped: `$` delimiters, `\\$`, `\\left`/`\\right`, spacing commands (`\\!`, `\\,`, `\\;`, `\\:`, `\\quad`),
  `\\displaystyle`, degree marks (`^\\circ`, `^{\\circ}`, `°`, `\\degree`), the percent sign (`50\\%` is
  graded as `50`, so `0.5` does *not* match `50\\%`: MATH asks for percentages as numbers of percent),
  a trailing unit in `\\text{}`/`\\mbox{}` after a value (`5\\text{ cm}^2` -> `5`), a trailing period;
- rewritten: `\\dfrac`/`\\tfrac` -> `\\frac`, `\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}`, `1{,}000`
  -> `1000`, plain e-notation `1.5e3` -> `1.5\\times10^{3}` (math-verify reads the `e` as Euler's number),
  the unicode minus `−` -> `-`, `(C)` -> `C` for a lone letter;
- word answers: a gold answer that is all `\\text{...}` with no digits (`\\text{Monday}`, `\\text{(C)}`) is
  compared as words, case-insensitively, here, never symbolically: sympy reads a bare word as a product
  of one-letter symbols (math-verify alone grades `on` equal to `no`), and `Monday.` as no answer at all.

Symbolic comparison: math-verify 0.9 defaults, except `allow_set_relation_comp=True` (so `x > 3` matches
`(3, \\infty)` whichever side is gold) and its SIGALRM timeouts off (the worker has its own deadline).

This module never executes model text itself, and imports neither sympy nor math-verify in the caller.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence

__all__ = [
    "extract_math_answer",
    "math_equal",
    "math_equal_many",
    "normalize_math_answer",
    "start_worker",
    "shutdown_worker",
]

# Answers longer than this are graded False without a comparison: no MATH answer is that long, and
# the symbolic comparison of such text is only ever slow.
MAX_ANSWER_CHARS = 4096
WORKER_MEMORY_BYTES = 2 << 30  # address-space limit of the worker; sympy for real answers needs ~0.3 GiB
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine; not charged to a comparison's timeout
# The worker's own alarm fires at this fraction of the timeout: most slow comparisons end there, which
# keeps the worker (a restart costs ~1 s of imports); the caller's kill at the full timeout is the backstop.
_SOFT_FRACTION = 0.8

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Final-answer markers for flexible mode, matched case-insensitively; the last occurrence in the text wins.
_MARKERS = ("answer is", "answer:", "####")


# --------------------------------------------------------------------------------------------- extraction


def _last_box(text: str) -> tuple[bool, str | None]:
    """(found, content) of the last `\\boxed{...}`/`\\fbox{...}`; content None when it is never closed.

    A linear scan: a backslash escapes the next character, so `\\{`/`\\}` (set braces) and `\\\\` (row
    breaks) do not count as nesting.
    """
    start = -1
    for cmd in _BOX_COMMANDS:
        pos = len(text)
        while True:  # the last occurrence that is the whole command, not `\boxedsomething`
            pos = text.rfind(cmd, 0, pos)
            if pos < 0:
                break
            after = pos + len(cmd)
            if after >= len(text) or not text[after].isalpha():
                start = max(start, pos)
                break
    if start < 0:
        return False, None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return True, None
    if text[i] != "{":
        # `\boxed 7`: TeX takes one token; accept a run up to whitespace or `$`.
        j = i
        while j < len(text) and not text[j].isspace() and text[j] != "$":
            j += 1
        return True, (text[i:j] or None)
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return True, text[i + 1 : j]
        j += 1
    return True, None  # truncated: the box never closes


def _marker_answer(text: str) -> str | None:
    """The text after the last final-answer marker (`The answer is X`, `Final answer: X`, `#### X`)."""
    lower = text.lower()
    best, best_end = -1, -1
    for m in _MARKERS:
        p = lower.rfind(m)
        if p > best:
            best, best_end = p, p + len(m)
    if best < 0:
        return None
    rest = text[best_end:].lstrip(" \t:*")
    line = rest.split("\n", 1)[0].strip()
    if not line:  # "Final answer:\n7": the answer is on the next non-empty line
        line = next((ln.strip() for ln in rest.splitlines() if ln.strip()), "")
    line = line.strip("* \t")
    if line.startswith("$"):  # `$\frac{1}{2}$. I hope it is correct.`: the maths span is the answer
        end = _closing_dollar(line)
        line = line[1:end] if end > 0 else line[1:]
    else:
        cut = line.find(". ")  # "7. So we are done." -> "7"; "3.5" has no space after its point
        if cut >= 0:
            line = line[:cut]
    line = line.strip().rstrip(".").strip()
    return line or None


def _closing_dollar(line: str) -> int:
    """Index of the `$` closing the span opened at line[0], skipping `\\$` (a dollar sign); -1 if none."""
    i = 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == "$":
            return i
        i += 1
    return -1


def extract_math_answer(completion: str, strict: bool = False) -> str | None:
    """The final answer text of a MATH-style completion, or None.

    strict: the content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces balanced; nothing else
    counts.  flexible (strict=False): the same, and when the completion has no box at all, the text after
    the last final-answer marker (`The answer is X`, `Final answer: X`, `#### X`).  A last box that never
    closes (generation cut off) gives None in both modes: the answer was not finished.  An empty box gives
    None.  The text is returned as written; `math_equal` does the normalising.
    """
    if not isinstance(completion, str):
        return None
    found, content = _last_box(completion)
    if found:
        return content if content and content.strip() else None
    if strict:
        return None
    return _marker_answer(completion)


# --------------------------------------------------------------------------------------------- normalising


def _closing_braces(s: str) -> dict[int, int]:
    """Index of each `{` -> index of its matching `}` (unmatched ones absent); `\\x` escapes x.  One pass."""
    match, stack, i = {}, [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
        i += 1
    return match


def _strip_braced_command(s: str, names: Sequence[str]) -> str:
    """Replace `\\name{X}` by `X` for the given commands (balanced braces; linear time)."""
    closing = _closing_braces(s)
    dropped: set[int] = set()  # closing braces of the commands removed so far
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\":
            name = next((n for n in names if s.startswith(n + "{", i + 1) and i + 1 + len(n) in closing), None)
            if name is None:
                out.append(s[i : i + 2])
                i += 2
                continue
            open_at = i + 1 + len(name)
            dropped.add(closing[open_at])
            i = open_at + 1
            continue
        if i not in dropped:
            out.append(s[i])
        i += 1
    return "".join(out)


_TEXT_CMDS = ("text", "textbf", "textrm", "textit", "mbox", "mathrm", "mathbf", "textnormal")
_WORD_CMDS = ("text", "textbf", "textrm", "textit", "mbox", "textnormal")  # not \mathbf{v}: a vector, not a word
_WHOLE_TEXT_RE = re.compile(r"^\\(?:" + "|".join(_TEXT_CMDS) + r")\{([^{}]*)\}$")
# a unit written in \text{} / \mbox{} after a value, with an optional power: `5\text{ cm}^2`
_UNIT_TAIL_RE = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?$")
# `\\` (a row break) is matched first and kept, so the `\ ` inside `\\ 3` is not taken for a space command.
_SPACING_RE = re.compile(r"(\\\\)|\\[!,;:> ]|\\q?quad(?![A-Za-z])|\\displaystyle(?![A-Za-z])|~")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])")
_PERCENT_RE = re.compile(r"\\?%")
_FRAC_SHORT_RE = re.compile(r"\\([dt]?frac)\s*(\d)\s*(\d)")
_FRAC_CMD_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_SQRT_SHORT_RE = re.compile(r"\\sqrt\s*(\d)")
_E_NOTATION_RE = re.compile(r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+))[eE]([-+]?\d+)$")  # unambiguous: no backtracking
_LONE_LETTER_RE = re.compile(r"^\(([A-Za-z])\)$")


def _drop_unit(s: str) -> str:
    """`5\\text{ cm}^2` -> `5`: the last text command, when it ends the answer and follows a value."""
    k = max(s.rfind("\\text{"), s.rfind("\\mbox{"), s.rfind("\\mathrm{"))
    if k > 0 and _UNIT_TAIL_RE.match(s, k):
        value = s[:k].rstrip()
        if value and value[-1] != "{":
            return value
    return s


def _clean(s: str) -> str:
    """Semantic-preserving cleanup (rules: module doc); keeps spaces, since LaTeX needs some (`\\pi r`)."""
    s = s.strip().replace("\\$", "").replace("$", "").replace("\u2212", "-")
    s = _SPACING_RE.sub(lambda m: m.group(1) or " ", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    s = _PERCENT_RE.sub("", s)
    s = _FRAC_SHORT_RE.sub(r"\\frac{\2}{\3}", s)
    s = _FRAC_CMD_RE.sub(r"\\frac", s)
    s = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", s)
    s = s.replace("{,}", "")
    s = s.strip().rstrip(".").strip()
    s = _drop_unit(s)
    m = _WHOLE_TEXT_RE.match(s)
    if m:
        s = m.group(1).strip()
    m = _E_NOTATION_RE.match(s)
    if m:
        s = f"{m.group(1)}\\times10^{{{m.group(2)}}}"
    m = _LONE_LETTER_RE.match(s)
    if m:
        s = m.group(1)
    return s.strip()


def _key(s: str) -> str:
    """Whitespace removed, except a single space kept between two letters/digits (`\\pi r`, `2 3`)."""
    return re.sub(r"\s+", lambda m: " " if _word_boundary(m) else "", s).strip()


def _word_boundary(m: re.Match) -> bool:
    s, a, b = m.string, m.start(), m.end()
    return 0 < a and b < len(s) and s[a - 1].isalnum() and s[b].isalnum()


def normalize_math_answer(s: str) -> str:
    """The string key the fast path compares (rules: module doc)."""
    return _key(_clean(s))


def _word_answer(gold: str) -> str | None:
    """Lower-cased words when the gold answer is wholly `\\text{...}` without digits, else None."""
    g = gold.strip().replace("$", "")
    if not g.startswith("\\"):
        return None
    inner = _strip_braced_command(g, _WORD_CMDS).strip()
    if g == inner or "\\" in inner or any(c.isdigit() for c in inner) or not any(c.isalpha() for c in inner):
        return None
    return _words(inner)


def _words(s: str) -> str:
    t = _strip_braced_command(s.strip().replace("$", ""), _TEXT_CMDS)
    t = _LONE_LETTER_RE.sub(r"\1", t.strip().rstrip(".").strip())
    return " ".join(t.lower().split())


# --------------------------------------------------------------------------------------------- the worker


class _WorkerError(RuntimeError):
    """The worker could not be started (math-verify missing, interpreter broken): not a grading result."""


class _Worker:
    """One child process speaking JSON lines: request {"gold", "pred", "soft"}, reply {"ok", "retire"}."""

    def __init__(self, memory_bytes: int):
        if not sys.executable:
            raise _WorkerError("no Python interpreter path (sys.executable) to start the math worker with")
        # -I: the child ignores PYTHON* variables, user site-packages and the current directory, so nothing
        # next to the caller can shadow sympy or math-verify; a new session keeps Ctrl-C to the caller.
        self.proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--worker", str(int(memory_bytes))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            start_new_session=True,
            close_fds=True,
        )
        self.owner = os.getpid()
        self.ready = False
        self.retired = False
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def usable(self) -> bool:
        return self.owner == os.getpid() and not self.retired and self.proc.poll() is None

    def _readline(self, deadline: float) -> bytes | None:
        """One reply line; None at the deadline; b"" at end of file (the child died)."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select.select: that fails for descriptors >= 1024
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line + b"\n"

    def wait_ready(self) -> None:
        if self.ready:
            return
        line = self._readline(time.monotonic() + STARTUP_TIMEOUT_S)
        msg = _loads(line)
        if not (isinstance(msg, dict) and msg.get("ready") is True):
            self.kill()
            detail = msg.get("error") if isinstance(msg, dict) else "no answer"
            raise _WorkerError(f"math worker did not start: {detail}")
        self.ready = True

    def ask(self, gold: str, pred: str, timeout: float) -> bool | None:
        """math-verify's verdict; None when the worker missed the deadline or died on this item."""
        request = json.dumps({"gold": gold, "pred": pred, "soft": _SOFT_FRACTION * timeout}) + "\n"
        self.proc.stdin.write(request.encode("ascii"))  # ensure_ascii: no raw newlines, no encoding errors
        reply = _loads(self._readline(time.monotonic() + timeout))
        if not isinstance(reply, dict):
            return None
        self.retired = bool(reply.get("retire"))
        return reply.get("ok") is True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (D state): leave it to the OS, never hang the caller
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _loads(line: bytes | None):
    if not line:
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


_lock = threading.Lock()
_worker: _Worker | None = None


def _live_worker() -> _Worker:
    global _worker
    if _worker is None or not _worker.usable():
        if _worker is not None and _worker.owner == os.getpid():
            _worker.kill()
        _worker = _Worker(WORKER_MEMORY_BYTES)
    _worker.wait_ready()
    return _worker


def _replace_worker() -> None:
    """Kill the current worker and start its replacement now, so the import overlaps the caller's work."""
    global _worker
    if _worker is not None:
        _worker.kill()
    _worker = _Worker(WORKER_MEMORY_BYTES)


def _verify_in_worker(gold: str, pred: str, timeout: float) -> bool:
    """Caller holds _lock."""
    for attempt in range(2):
        worker = _live_worker()
        try:
            verdict = worker.ask(gold, pred, timeout)
        except (BrokenPipeError, ConnectionResetError):
            # died before reading the request (e.g. killed from outside between calls): not this item's fault
            worker.retired = True
            if attempt == 0:
                continue
            return False
        if verdict is None:  # missed the deadline or crashed on this very item
            _replace_worker()
            return False
        return verdict
    return False


def start_worker() -> int:
    """Start the worker now and wait until it has imported math-verify (about a second); returns its pid.

    Optional: the first comparison that needs the worker does this itself, and that wait is not charged
    to its timeout.  Raises RuntimeError when the worker cannot start (math-verify not installed).
    """
    with _lock:
        return _live_worker().pid


def shutdown_worker() -> None:
    """Stop the worker process (it is started again on the next comparison that needs it)."""
    global _worker
    with _lock:
        if _worker is not None and _worker.owner == os.getpid():
            _worker.kill()
        _worker = None


def _reset_in_child() -> None:
    # A forked child must not share the parent's worker pipes, nor inherit a lock held by another thread.
    global _lock, _worker
    _lock = threading.Lock()
    _worker = None


atexit.register(shutdown_worker)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


# --------------------------------------------------------------------------------------------- grading


def _prepare(gold: str, predicted: str | None) -> tuple[bool | None, str, str]:
    """(verdict or None when the worker must decide, cleaned gold, cleaned prediction)."""
    if not isinstance(gold, str) or not isinstance(predicted, str):
        return False, "", ""
    if len(gold) > MAX_ANSWER_CHARS or len(predicted) > MAX_ANSWER_CHARS:
        return False, "", ""
    words = _word_answer(gold)
    if words is not None:
        return words == _words(predicted), "", ""
    g, p = _clean(gold), _clean(predicted)
    if not g or not p:
        return False, "", ""
    if _key(g) == _key(p):
        return True, g, p
    return None, g, p


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")


def math_equal(gold: str, predicted: str | None, timeout: float = 5.0) -> bool:
    """Whether `predicted` (an extracted answer, e.g. from `extract_math_answer`) equals the gold answer.

    Normalised string equality answers True at once (rules: module doc); otherwise math-verify decides,
    `verify(parse("\\boxed{gold}"), parse("\\boxed{pred}"))` on the cleaned texts, in the worker process,
    within `timeout` seconds of wall-clock time.  A timeout, crash or resource error there is False, never
    an exception.  Raises RuntimeError only when the worker cannot be started at all (math-verify missing).
    """
    _check_timeout(timeout)
    verdict, g, p = _prepare(gold, predicted)
    if verdict is not None:
        return verdict
    with _lock:
        return _verify_in_worker(g, p, float(timeout))


def math_equal_many(pairs: Iterable[tuple[str, str | None]], timeout: float = 5.0) -> list[bool]:
    """`math_equal` for each (gold, predicted) pair, in order; `timeout` is per pair.

    The worker is started once and reused; each pair that needs it costs one pipe round trip (well under
    a millisecond), not a process start, and a pair that times out costs one worker restart.
    """
    _check_timeout(timeout)
    prepared = [_prepare(g, p) for g, p in pairs]
    out: list[bool] = []
    with _lock:
        for verdict, g, p in prepared:
            out.append(verdict if verdict is not None else _verify_in_worker(g, p, float(timeout)))
    return out


# --------------------------------------------------------------------------------------------- worker side


class _SoftTimeout(BaseException):
    """Raised by the worker's own alarm; a BaseException so math-verify's `except Exception` lets it through."""


def _worker_main(memory_bytes: int) -> None:
    """Child process: limit memory, import math-verify, then grade one JSON request per line until EOF."""
    import logging
    import resource
    import signal

    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything a library prints goes to stderr (/dev/null), never into the protocol
    sys.stdout = sys.stderr

    def send(obj) -> None:
        protocol.write((json.dumps(obj) + "\n").encode("ascii"))

    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        logging.disable(logging.CRITICAL)  # math-verify logs every timeout and parse failure
        from math_verify import parse, verify
    except BaseException as e:  # report why, so the caller raises instead of grading everything False
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return

    parent = os.getppid()

    def watchdog() -> None:  # stdin EOF ends an idle worker; this ends one stuck in a computation
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    send({"ready": True})
    for line in sys.stdin.buffer:
        retire = False
        try:
            req = json.loads(line)
            try:
                # Our alarm, a little before the caller's deadline, usually saves a restart; math-verify's
                # own alarms are off (None) since they would reset ours.
                signal.setitimer(signal.ITIMER_REAL, max(float(req["soft"]), 0.05))
                ok = bool(
                    verify(
                        parse(f"\\boxed{{{req['gold']}}}", parsing_timeout=None),
                        parse(f"\\boxed{{{req['pred']}}}", parsing_timeout=None),
                        timeout_seconds=None,
                        allow_set_relation_comp=True,
                    )
                )
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            ok = False
        except MemoryError:
            ok, retire = False, True  # recoverable in principle, but start clean rather than trust the heap
        except Exception:
            ok = False
        try:
            send({"ok": ok, "retire": retire})
        except (BrokenPipeError, MemoryError):
            return
        if retire:
            return


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker_main(int(sys.argv[2]))
