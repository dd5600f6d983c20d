"""Nothing runs that should not: no code-executing deserialisers or eval in src/, no remote code unless
the user asks, and model text only ever meets bounded parsers."""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import time
import tokenize
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aftune import config as C
from aftune.tasks import get_task
from aftune.tasks.answers import check_annotations, equation_list, extract_number, normalize_number, safe_eval

SRC = Path(__file__).resolve().parents[1] / "src" / "aftune"

# Regexes run on code with strings and comments blanked out, so docs saying "never eval(" do not count.
# The look-behind keeps names such as safe_eval(, literal_eval(, eval_steps and model.eval() legal.
BANNED = {
    "builtin eval": r"(?<![\w.])eval\s*\(",
    "builtin exec": r"(?<![\w.])exec\s*\(",
    "pickle-style load": r"\b(?:pickle|cPickle|_pickle|dill|joblib|marshal|shelve)\s*\.\s*(?:loads?|open|Unpickler)\b",
    "yaml.load (use safe_load)": r"\byaml\s*\.\s*(?:load|load_all|unsafe_load|full_load|Loader|UnsafeLoader|FullLoader)\b",
    "hard-coded trust_remote_code=True": r"\btrust_remote_code\s*=\s*True\b",
    "shell=True": r"\bshell\s*=\s*True\b",
    "os.system": r"\bos\s*\.\s*(?:system|popen)\s*\(",
}


def code_only(source: str) -> str:
    """The source with every string literal and comment replaced by spaces (line/column layout kept)."""
    lines = source.splitlines(keepends=True)
    out = [list(l) for l in lines]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                row = out[r - 1]
                for c in range(c0 if r == r0 else 0, c1 if r == r1 else len(row)):
                    if row[c] != "\n":
                        row[c] = " "
    return "".join("".join(r) for r in out)


def scan(source: str) -> list[str]:
    """Names of the banned patterns found, plus torch.load calls without weights_only=True."""
    code = code_only(source)
    found = [name for name, pat in BANNED.items() if re.search(pat, code)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            is_torch_load = (
                isinstance(f, ast.Attribute)
                and f.attr == "load"
                and isinstance(f.value, ast.Name)
                and f.value.id == "torch"
            )
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            if is_torch_load and not safe:
                found.append("torch.load without weights_only=True")
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append("torch.load without weights_only=True")
    return found


def src_files() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20  # the scan must actually see the package
    return files


@pytest.mark.parametrize(
    "snippet, banned",
    [
        ("x = eval(s)", ["builtin eval"]),
        ("y = eval (s)", ["builtin eval"]),
        ("exec(code)", ["builtin exec"]),
        ("import pickle\nobj = pickle.load(f)", ["pickle-style load"]),
        ("obj = pickle.loads(b)", ["pickle-style load"]),
        ("cfg = yaml.load(text)", ["yaml.load (use safe_load)"]),
        ("cfg = yaml.load(text, Loader=yaml.Loader)", ["yaml.load (use safe_load)"]),
        ("m = f(name, trust_remote_code=True)", ["hard-coded trust_remote_code=True"]),
        ("sd = torch.load(path)", ["torch.load without weights_only=True"]),
        ("sd = torch.load(path, weights_only=False)", ["torch.load without weights_only=True"]),
        ("from torch import load", ["torch.load without weights_only=True"]),
        ("subprocess.run(cmd, shell=True)", ["shell=True"]),
        # legitimate look-alikes
        ("model.eval()\nself.model.eval()", []),
        ("args = dict(eval_steps=5, eval_strategy='steps')\nv = safe_eval(e)\nast.literal_eval(s)", []),
        ("def run_eval(cfg): pass\nrun_eval(cfg)", []),
        ("sd = torch.load(path, map_location='cpu', weights_only=True)", []),
        ("cfg = yaml.safe_load(text)", []),
        ("m = f(name, trust_remote_code=trust_remote_code)", []),
        ("# never call eval( on model text\ns = 'exec(x) and pickle.load(f)'", []),
        ('"""Docs: yaml.load( is unsafe; trust_remote_code=True runs code."""', []),
    ],
)
def test_scanner_flags_exactly_the_banned_calls(snippet, banned):
    assert sorted(set(scan(snippet))) == sorted(banned)


def test_src_has_no_code_executing_calls():
    hits = {str(p.relative_to(SRC)): found for p in src_files() if (found := scan(p.read_text()))}
    assert not hits, f"banned calls in src/aftune: {hits}"


def test_trust_remote_code_defaults_false_everywhere():
    seen = 0
    for path in src_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = (
                    [None] * (len(node.args.args) - len(node.args.defaults))
                    + node.args.defaults
                    + node.args.kw_defaults
                )
                for a, d in zip(args, defaults):
                    if a.arg == "trust_remote_code":
                        seen += 1
                        assert isinstance(d, ast.Constant) and d.value is False, f"{path}:{node.lineno} {node.name}"
    assert seen >= 3  # load_model, load_tokenizer, load_model_and_tokenizer at least
    for cls in (C.SFTConfig, C.SampleConfig, C.AlignConfig, C.EvalConfig, C.AssessConfig):
        assert cls().trust_remote_code is False
        f = {f.name: f for f in dataclasses.fields(cls)}["trust_remote_code"]
        assert f.default is False


def test_cli_trust_remote_code_flag_defaults_off():
    from aftune.cli import app

    for name in ("sft", "sample", "align", "eval", "assess"):
        opt = {p.name: p for p in app.commands[name].params}["trust_remote_code"]
        assert opt.default is False, name


# ---------------------------------------------------------------- bounded parsers on hostile text


@pytest.mark.parametrize(
    "expr",
    [
        "9**9**9",
        "2**2**2**2**2",
        "(10**15)**32",
        "10**16",
        "99999999999999*99999999999999",
        "1/0",
        "0**-1",
        "(" * 500 + "1" + ")" * 500,
        "-" * 150 + "1",
        "1+" * 150 + "1",
        "1" * 201,
        "__import__('os').system('echo pwned')",
        "open('/etc/passwd').read()",
        "lambda: 1",
        "1;2",
        "2**0.5",
    ],
)
def test_safe_eval_rejects_huge_or_hostile_expressions_fast(expr):
    t0 = time.perf_counter()
    assert safe_eval(expr) is None
    assert time.perf_counter() - t0 < 0.05


def test_safe_eval_still_computes_normal_expressions():
    assert safe_eval("48/2") == 24
    assert safe_eval("2**10 - 1,000") == 24
    assert safe_eval("-2**2") == -4
    assert safe_eval("(1.5 + 2.5) x 3") == 12
    assert safe_eval("10**15") == 10**15
    assert safe_eval("1/3") == Fraction(1, 3)


TASKS = [get_task(n) for n in ("arith", "gsm8k", "aqua", "ecqa")]  # constructors load no data
# Pieces of the syntax the extractors look for, so examples reach their deep paths, not only "no number".
_PIECES = list("0123456789+-*/().,^%$= eE#:ABCDEx\n") + [
    "**",
    "<<",
    ">>",
    "The answer is ",
    "#### ",
    "(A)",
    "1,000",
    "9**9**9",
    "=",
    "Answer: ",
    "\u2212",
    "**73**",
]
_TEXTY = st.lists(st.sampled_from(_PIECES), max_size=120).map("".join)
_ANY = st.one_of(st.text(max_size=600), _TEXTY, st.binary(max_size=300).map(lambda b: b.decode("latin-1")))


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(text=_ANY)
def test_extractors_and_calculator_are_total_and_fast_on_any_text(text):
    t0 = time.perf_counter()
    for task in TASKS:
        for strict in (False, True):
            ans = task.extract_answer(text, strict=strict)
            assert ans is None or isinstance(ans, str)
        assert isinstance(task.answers_match(task.extract_answer(text), "7"), bool)
        steps = task.wrong_steps(text)
        assert isinstance(steps, int) and steps >= 0
    v = safe_eval(text)
    assert v is None or isinstance(v, Fraction)
    n = normalize_number(text)
    assert n is None or isinstance(n, str)
    assert all(isinstance(ok, bool) for ok in check_annotations(text))
    assert isinstance(equation_list(text), tuple)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "text",
    [
        "1," * 20000 + "1",
        "9" * 100000,
        "The answer is " + "9" * 5000,
        "<<" + "9**9**9=1>>" * 2000,
        "(" * 50000,
        "The answer is " * 5000 + "-" * 5000,
        "1e" * 20000,
        "$" * 30000 + "5",
        "**" * 20000 + "7",
        "A) " * 10000,
        "#### " + "0." * 20000,
    ],
)
def test_extractors_have_no_catastrophic_backtracking(text):
    t0 = time.perf_counter()
    for task in TASKS:
        task.extract_answer(text)
        task.wrong_steps(text)
    extract_number(text, strict=True)
    assert time.perf_counter() - t0 < 2.0
