"""aftune.yaml_io, the one YAML reader: the data is what yaml.safe_load gives, every key's line is its own mark
(a nested key of the same name written earlier cannot shadow it), and hostile files (alias bombs, recursive
aliases, deep nesting, Python tags) are one InputError naming the file, fast. Each reader that uses it
(--config, experiment and arms study files, task files) is checked on the nested-key and the bomb case."""

from __future__ import annotations

import doctest
import time
from pathlib import Path

import pytest
import yaml
from conftest import cli

import aftune.yaml_io
from aftune.commands.experiment.arms import load_arms_study
from aftune.commands.experiment.config import load_experiment
from aftune.config import SampleConfig, load_yaml_config
from aftune.io import InputError
from aftune.tasks.file_task import read_task_spec
from aftune.yaml_io import MAX_NODES, read_yaml, read_yaml_mapping

ROOT = Path(__file__).resolve().parents[1]

# Nine anchors, each a list of nine aliases to the one before: 9^9 (387 million) strings once expanded.
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_doctest():
    assert doctest.testmod(aftune.yaml_io).failed == 0


@pytest.fixture(params=["libyaml", "python"])
def loader(request, monkeypatch):
    """Both parsers PyYAML may have: libyaml (used when present) and the pure-Python fallback."""
    if request.param == "libyaml" and not hasattr(yaml, "CSafeLoader"):
        pytest.skip("PyYAML without libyaml")
    monkeypatch.setattr(aftune.yaml_io, "_LOADER", getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if request.param == "python":
        monkeypatch.setattr(aftune.yaml_io, "_LOADER", yaml.SafeLoader)
    return request.param


def test_line_of_key_paths(tmp_path, loader):
    doc = read_yaml(
        _write(
            tmp_path / "c.yaml",
            "plan:\n"  # 1
            "  lr: 0.1\n"  # 2
            "grids:\n"  # 3
            "  - methods: [bc]\n"  # 4
            "    k: 4\n"  # 5
            "  - {k: 8}\n"  # 6
            "arms:\n"  # 7
            "  a.b: {command: align, method: bc}\n"  # 8
            "  c:\n"  # 9
            "    max-steps: 3\n"  # 10
            "lr: 3\n"  # 11
            "lr: 4\n",  # 12: a repeated key holds the last value, and so does its line
        )
    )
    assert doc.data["lr"] == 4 and doc.data["arms"]["a.b"] == {"command": "align", "method": "bc"}
    assert doc.line("lr") == 12  # not line 2's nested `lr:`
    assert doc.line("plan.lr") == 2
    assert doc.line("grids[0].k") == 5 and doc.line("grids.1.k") == 6 and doc.line("grids[1]") == 6
    assert doc.line("arms.a.b.method") == 8  # an arm name holding a dot
    assert doc.line(("arms", "a.b", "command")) == 8
    assert doc.line("arms.c.max_steps") == 10  # flag names are accepted with `-` or `_`
    assert doc.line("arms.c.nope") == 9  # a missing key: its closest written parent
    assert doc.line("grids[7].k") == 3
    assert doc.line("nope") is None and doc.line("") is None
    e = doc.error("plan.lr", "must be > 0")
    assert str(e) == f"{tmp_path / 'c.yaml'}: line 2: field 'plan.lr': must be > 0"


def test_data_equals_safe_load_on_every_shipped_yaml():
    files = sorted(ROOT.glob("configs/**/*.yaml"))
    assert len(files) > 10
    for path in files:
        assert read_yaml(path).data == yaml.safe_load(path.read_text()), path


def test_small_aliases_and_merge_keys_are_read_like_safe_load(tmp_path):
    text = "defaults: &d {command: align, lr: 0.1}\narms:\n  x:\n    <<: *d\n    method: bc\n  y: *d\n"
    doc = read_yaml(_write(tmp_path / "s.yaml", text))
    assert doc.data == yaml.safe_load(text)
    assert doc.data["arms"]["x"] == {"command": "align", "lr": 0.1, "method": "bc"}
    assert doc.line("arms.x.method") == 5 and doc.line("arms.x.lr") == 1  # a merged key: where it is written


@pytest.mark.parametrize(
    "text, message",
    [
        (BOMB, f"refusing a file whose anchors and aliases expand to more than {MAX_NODES:,} values"),
        ("a: &a [1, *a]\n", "refusing a recursive alias"),
        ("a: &a {b: *a}\n", "refusing a recursive alias"),
        ("[" * 500 + "]" * 500 + "\n", "refusing a file nested more than 100 levels deep"),
        ("[" * 20000 + "\n", "not valid YAML (exceeded maximum nesting depth)"),  # libyaml's own bound
        ("name: !!python/object/apply:os.system ['echo hacked']\n", "line 1: not valid YAML (could not determine"),
        ("a: 1\n---\nb: 2\n", "line 2: not valid YAML (but found another document)"),
        ("a: [1, 2\n", "not valid YAML ("),
    ],
    ids=[
        "billion laughs",
        "recursive list",
        "recursive mapping",
        "deep nesting",
        "deeper",
        "python tag",
        "two docs",
        "syntax",
    ],
)
def test_hostile_or_broken_files_are_one_error_naming_the_file(tmp_path, text, message, loader):
    if loader == "python" and "maximum nesting" in message:
        pytest.skip("libyaml's bound; the pure-Python scanner takes seconds on 20,000 brackets")
    path = _write(tmp_path / "bad.yaml", text)
    t0 = time.perf_counter()
    with pytest.raises(InputError) as e:
        read_yaml(path)
    assert time.perf_counter() - t0 < 2
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_just_under_the_bound_is_read(tmp_path):
    # 40 aliases to a list of 40 values: about 1,700 values once expanded, a legitimate use of aliases.
    text = "a: &a [" + ",".join(["x"] * 40) + "]\nb: &b [" + ",".join(["*a"] * 40) + "]\n"
    assert read_yaml(_write(tmp_path / "ok.yaml", text)).data["b"][39][39] == "x"


def test_mapping_reader(tmp_path):
    assert read_yaml_mapping(_write(tmp_path / "e.yaml", "")).data == {}
    with pytest.raises(InputError, match="expected a mapping of keys to values, got list"):
        read_yaml_mapping(_write(tmp_path / "l.yaml", "- 1\n"))
    with pytest.raises(InputError, match="config file does not exist"):
        read_yaml_mapping(tmp_path / "none.yaml", "config file")
    (tmp_path / "b.yaml").write_bytes(b"a: \xff\n")
    with pytest.raises(InputError, match="not UTF-8 text"):
        read_yaml(tmp_path / "b.yaml")


# ------------------------------------------------------- every reader: a nested key before the top-level one


def test_config_error_points_at_the_top_level_key(tmp_path):
    # the block scalar's `k: 3` line starts with `k:` too; the error is about line 3
    path = _write(tmp_path / "cfg.yaml", "task_args: |\n  k: 3\nk: four\n")
    with pytest.raises(InputError) as e:
        load_yaml_config(path, SampleConfig)
    assert str(e.value) == f"{path}: line 3: field 'k': expected int, got str"


def test_config_error_through_the_cli(tmp_path):
    path = _write(tmp_path / "cfg.yaml", "task_args: |\n  k: 3\nk: four\n")
    r = cli("sample", "--config", path, "--out", tmp_path / "c.jsonl")
    assert r.code == 2 and r.error_lines == [f"error: {path}: line 3: field 'k': expected int, got str"]


def test_experiment_error_points_at_the_top_level_key(tmp_path):
    path = _write(tmp_path / "exp.yaml", "name: x\nbase: quick\nplan:\n  k: 4\nseeds: [0]\nk: [1]\n")
    with pytest.raises(InputError, match="every k must be >= 2") as e:
        load_experiment(path)
    assert (e.value.line, e.value.field) == (6, "k")
    path = _write(tmp_path / "exp2.yaml", "plan:\n  k: 4\ngrids:\n  - k: 4\n  - methods: [bc]\n    kk: 2\n")
    with pytest.raises(InputError, match="unknown key") as e:
        load_experiment(path)
    assert (e.value.line, e.value.field) == (6, "grids[1].kk")


def test_arms_study_error_points_at_the_top_level_key(tmp_path):
    text = (
        "base: quick\n"
        "arms:\n"
        "  control: {command: align, method: vft}\n"
        "  fast:\n"
        "    command: align\n"
        "    method: bc\n"
        "    lr: 0.001\n"  # 7: a nested lr
        "lr: 0.1\n"  # 8: the top-level lr the error is about
    )
    path = _write(tmp_path / "arms.yaml", text)
    with pytest.raises(InputError, match="unknown key") as e:
        load_arms_study(path)
    assert (e.value.line, e.value.field) == (8, "lr")
    # inside an arm: the arm's own key, not an earlier arm's key of the same name
    text = "base: quick\narms:\n  control: {command: align, method: vft, lr: 0.1}\n  fast:\n    method: bc\n"
    path = _write(tmp_path / "arms2.yaml", text + "    command: align\n    lr: abc\n")
    with pytest.raises(InputError, match="expected float, got str") as e:
        load_arms_study(path)
    assert (e.value.line, e.value.field) == (7, "arms.fast.lr")


def test_task_file_error_points_at_the_top_level_key(tmp_path):
    text = (
        "name: t\n"
        "fields: {question: q, solution: s}\n"
        "data:\n"
        "  train: a.jsonl\n"
        "  stop: x\n"  # 5: a nested `stop:` (an unknown data key) before the top-level one
        "answer_type: number\n"
        "stop: [1]\n"
    )
    path = _write(tmp_path / "task.yaml", text)
    with pytest.raises(InputError) as e:
        read_task_spec(path)
    assert str(e.value) == f"{path}: line 7: field 'stop': entry 0: expected a non-empty string, got 1"


# ------------------------------------------------------------------------- the bomb through every reader


def test_bomb_task_file_through_the_cli_is_one_line_fast(tmp_path):
    path = _write(tmp_path / "bomb.yaml", BOMB)
    cli("tasks")  # imports paid before the clock starts
    t0 = time.perf_counter()
    r = cli("eval", "--task", path, "--model", "arith-base", "--out", tmp_path / "e.json", "--quiet")
    assert time.perf_counter() - t0 < 2
    assert r.code == 2 and len(r.error_lines) == 1 and "Traceback" not in r.stderr
    assert r.error_lines[0].startswith(f"error: {path}: refusing a file whose anchors and aliases expand")


@pytest.mark.parametrize(
    "load",
    [lambda p: load_yaml_config(p, SampleConfig), load_experiment, load_arms_study, read_task_spec],
    ids=["config", "experiment", "arms", "task"],
)
def test_bomb_is_refused_by_every_reader(tmp_path, load):
    path = _write(tmp_path / "bomb.yaml", BOMB)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="refusing a file whose anchors and aliases expand") as e:
        load(path)
    assert time.perf_counter() - t0 < 2 and e.value.path is not None and str(e.value.path) == str(path)
