"""Every kind of bad input gives ONE line `error: <file>: line N: field 'x': message` (the parts that apply),
exit status 2, no traceback, and leaves existing outputs byte-for-byte as they were.

Cases run through the real CLI entry point (aftune.cli.main) in-process; an uncaught exception would
fail the test, so "no traceback" is checked too. Two cases also run as real processes. The table in
docs/errors.md lists the same cases (checked at the end).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import SAMPLE, TINY, cli, snapshot, start_cli

ROOT = Path(__file__).resolve().parents[1]


def _rewrite(path: Path, edit=None, raw: dict[int, str] | None = None) -> None:
    """Apply edit(obj, index) to every record of a JSONL file; raw: replace line i by this text."""
    lines = []
    for i, line in enumerate(path.read_text().splitlines()):
        obj = json.loads(line)
        if edit is not None:
            edit(obj, i)
        lines.append((raw or {}).get(i, json.dumps(obj)))
    path.write_text("".join(l + "\n" for l in lines))


def _edit_meta(cands: Path, edit) -> None:
    meta = cands.with_name(cands.name + ".meta.json")
    obj = json.loads(meta.read_text())
    edit(obj)
    meta.write_text(json.dumps(obj))


def _set(i_target, fn):
    def edit(obj, i):
        if i == i_target:
            fn(obj)

    return edit


# Each case: (setup(tmp, model, cands) -> argv, expected line as a regex with {C} {Y} {OUT} {M} placeholders).
def _align(*extra):
    return lambda t, m, c: [
        "align",
        "--model",
        m,
        "--candidates",
        c,
        "--task-args",
        "n_train=200",
        "--quiet",
        "--out",
        t / "out",
        *extra,
    ]


def _sample(*extra):
    return lambda t, m, c: ["sample", "--model", m, "--out", c, *SAMPLE, *extra]


def _bad_json(t, m, c):
    _rewrite(c, raw={1: c.read_text().splitlines()[1][:-7]})
    return _align()(t, m, c)


def _missing_field(t, m, c):
    _rewrite(c, _set(2, lambda o: o.pop("prompt")))
    return _align()(t, m, c)


def _mistyped_field(t, m, c):
    _rewrite(c, _set(0, lambda o: o["candidates"][0].update(correct="yes")))
    return _align()(t, m, c)


def _not_object(t, m, c):
    _rewrite(c, raw={3: "[1, 2, 3]"})
    return _align()(t, m, c)


def _empty_candidates(t, m, c):
    c.write_text("")
    return _align()(t, m, c)


def _other_task(t, m, c):
    _rewrite(c, lambda o, i: o.update(task="gsm8k"))
    return _align()(t, m, c)


def _resume_other_tokenizer(t, m, c):
    _edit_meta(c, lambda o: o["tokenizer"].update(vocab_size=32000))
    return _sample()(t, m, c)


def _resume_other_task(t, m, c):
    _edit_meta(c, lambda o: o.update(task="gsm8k"))
    return _sample()(t, m, c)


def _resume_without_meta(t, m, c):
    c.with_name(c.name + ".meta.json").unlink()
    return _sample()(t, m, c)


def _yaml(text: str, cmd: str = "sample"):
    def setup(t, m, c):
        y = t / "cfg.yaml"
        y.write_text(text)
        return [cmd, "--config", y, "--model", m, "--out", c, "--quiet"]

    return setup


def _not_a_model(t, m, c):
    (t / "empty").mkdir()
    return _sample("--model", t / "empty")(t, m, c)


CASES = {
    "candidates: malformed JSON line": (_bad_json, r"{C}: line 2: not valid JSON \(.+\)"),
    "candidates: missing field": (_missing_field, r"{C}: line 3: field 'prompt': missing field"),
    "candidates: mistyped field": (
        _mistyped_field,
        r"{C}: line 1: field 'candidates\[0\]\.correct': expected bool, got str",
    ),
    "candidates: line not an object": (_not_object, r"{C}: line 4: expected a JSON object"),
    "candidates: empty file": (_empty_candidates, r"{C}: no candidate groups \(empty file\)"),
    "candidates: file does not exist": (
        lambda t, m, c: _align()(t, m, t / "nope.jsonl"),
        r"{T}/nope\.jsonl: file does not exist",
    ),
    "candidates: from a different task": (
        _other_task,
        r"{C}: line 1: field 'task': candidates are for task 'gsm8k', but --task is 'arith'",
    ),
    "sample resume: different k": (
        _sample("--k", "3"),
        r"{C}\.meta\.json: field 'sampling\.k': this file was sampled with sampling\.k=4 but this run uses 3; .+",
    ),
    "sample resume: different tokenizer": (
        _resume_other_tokenizer,
        r"{C}\.meta\.json: field 'tokenizer\.vocab_size': this file was sampled with tokenizer\.vocab_size=32000 but this run uses 300; .+",
    ),
    "sample resume: different task": (
        _resume_other_task,
        r"{C}\.meta\.json: field 'task': this file was sampled with task='gsm8k' but this run uses 'arith'; .+",
    ),
    "sample resume: no meta sidecar": (
        _resume_without_meta,
        r"{C}: has candidates but no cands\.jsonl\.meta\.json to check them against; .+",
    ),
    "unknown method": (
        _align("--method", "boundary"),
        r"field '--method': unknown method 'boundary'; choose one of: vft, .+",
    ),
    "beta = 0": (_align("--beta", "0"), r"field '--beta': must be > 0, got 0\.0"),
    "beta < 0": (_align("--beta", "-0.5"), r"field '--beta': must be > 0, got -0\.5"),
    "beta NaN": (_align("--beta", "nan"), r"field '--beta': must be > 0, got nan"),
    "dpo-beta <= 0": (_align("--dpo-beta", "0"), r"field '--dpo-beta': must be > 0, got 0\.0"),
    "max-steps < 1": (_align("--max-steps", "0"), r"field '--max-steps': must be >= 1, got 0"),
    "k < 2": (_sample("--k", "1"), r"field '--k': k must be >= 2 to have anything to compare, got 1"),
    "n-questions < 1": (_sample("--n-questions", "-3"), r"field '--n-questions': must be >= 1, got -3"),
    "model path does not exist (sample)": (
        _sample("--model", "/nonexistent/model"),
        r"/nonexistent/model: field '--model': model path does not exist",
    ),
    "model path does not exist (align)": (
        _align("--model", "./no/such/model"),
        r"\./no/such/model: field '--model': model path does not exist",
    ),
    "model path does not exist (sft)": (
        lambda t, m, c: ["sft", *TINY, "--model", "/no/model", "--out", t / "out"],
        r"/no/model: field '--model': model path does not exist",
    ),
    "model path does not exist (eval)": (
        lambda t, m, c: ["eval", "--model", "/no/model", "--out", t / "out" / "eval.json"],
        r"/no/model: field '--model': model path does not exist",
    ),
    "model folder is not a model": (_not_a_model, r"{T}/empty: field '--model': cannot load a model from here \(.+\)"),
    "empty split (sft)": (
        lambda t, m, c: ["sft", *TINY, "--task-args", "n_train=0", "--out", t / "out"],
        r"field '--task': split 'train' of task 'arith' is empty",
    ),
    "empty split (sample)": (
        _sample("--split", "validation", "--task-args", "n_validation=0"),
        r"field '--split': split 'validation' of task 'arith' is empty",
    ),
    "unknown split": (_sample("--split", "dev"), r"field '--split': task 'arith': unknown split 'dev'; .+"),
    "unknown task": (_align("--task", "gsm9k"), r"field '--task': unknown task 'gsm9k'; known tasks: .+"),
    "unknown task option": (
        _align("--task-args", "n_trian=5"),
        r"field '--task': task 'arith' has no option\(s\) n_trian; .+",
    ),
    "malformed --task-args": (
        _align("--task-args", "n_train"),
        r"field '--task-args': expected key=value, got 'n_train'",
    ),
    "config: unknown key": (
        _yaml("k: 4\nbatch_sise: 2\n"),
        r"{Y}: line 2: field 'batch_sise': unknown key \(known: .+\)",
    ),
    "config: not valid YAML": (_yaml("k: 4\nseed: [1, 2\n"), r"{Y}: line \d+: not valid YAML \(.+\)"),
    "config: mistyped value": (_yaml("seed: 0\nk: four\n"), r"{Y}: line 2: field 'k': expected int, got str"),
    "config: not a mapping": (_yaml("- k\n- 4\n"), r"{Y}: expected a mapping of keys to values, got list"),
    "config: file does not exist": (
        lambda t, m, c: ["align", "--config", t / "none.yaml"],
        r"{T}/none\.yaml: config file does not exist",
    ),
    "config: alias bomb": (
        # nine anchors, each nine aliases of the one before: 9^9 values if expanded (tests/test_yaml_io.py)
        _yaml(
            "a: &a [x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
        ),
        r"{Y}: refusing a file whose anchors and aliases expand to more than 100,000 values \(.+\); write the "
        r"values out instead",
    ),
}


def _expected(pattern: str, tmp: Path, cands: Path, yaml: Path) -> str:
    return "error: " + (
        pattern.replace("{C}", re.escape(str(cands)))
        .replace("{Y}", re.escape(str(yaml)))
        .replace("{T}", re.escape(str(tmp)))
    )


@pytest.fixture
def existing_outputs(tmp_path, candidates):
    """An earlier run's outputs that a failing command must not touch: a candidates file with its meta and
    config, and an align OUT folder."""
    (tmp_path / "cands.config.yaml").write_text("k: 4\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("method: bc\n")
    (out / "metrics.json").write_text('{"steps": 3}\n')
    return tmp_path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line_and_touches_nothing(case, tmp_path, tiny_model, candidates, existing_outputs):
    setup, pattern = CASES[case]
    argv = setup(tmp_path, tiny_model, candidates)
    before = snapshot(tmp_path)
    r = cli(*argv)
    assert r.code == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.error_lines) == 1, r.stderr
    assert re.fullmatch(_expected(pattern, tmp_path, candidates, tmp_path / "cfg.yaml"), r.error_lines[0]), (
        r.error_lines[0]
    )
    assert snapshot(tmp_path) == before, "a failed command changed existing files"


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (lambda t, m, c: _bad_json(t, m, c), r"error: {C}: line 2: not valid JSON \(.+\)"),
        (
            _yaml("seed: 1\nbatch_sise: 2\n", "align"),
            r"error: {Y}: line 2: field 'batch_sise': unknown key \(known: .+\)",
        ),
    ],
    ids=["bad candidates (align)", "unknown config key"],
)
def test_real_process_prints_exactly_one_line(argv, pattern, tmp_path, tiny_model, candidates):
    """The console script itself: stderr is exactly one line (library chatter included), exit 2."""
    args = argv(tmp_path, tiny_model, candidates)
    proc = start_cli(*args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(
        pattern.replace("{C}", re.escape(str(candidates))).replace("{Y}", re.escape(str(tmp_path / "cfg.yaml"))),
        err.strip(),
    ), err


def test_docs_table_lists_every_case():
    doc = (ROOT / "docs" / "errors.md").read_text()
    missing = [case for case in CASES if f"| {case} |" not in doc]
    assert not missing, f"docs/errors.md lacks rows for: {missing}"
