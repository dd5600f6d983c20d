"""The step runner of multi-step commands: each step once, its time kept, and elapsed / time-left lines."""

from __future__ import annotations

import json

from aftune.commands import resumable
from aftune.commands.resumable import Steps


class _Clock:
    def __init__(self, *ticks: float):
        self.ticks = list(ticks)

    def time(self) -> float:
        return self.ticks.pop(0)


def test_steps_print_elapsed_and_time_left(tmp_path, monkeypatch, capsys):
    # start 100; step a runs 100 -> 110; the progress line reads the clock at 110 again
    monkeypatch.setattr(resumable, "time", _Clock(100.0, 100.0, 110.0, 110.0, 110.0, 131.0, 131.0))
    step = Steps(tmp_path, "demo", expected={"a": 1.0, "b": 3.0, "c": 2.0})
    ran = []
    step("a", tmp_path / "a.done", ran.append, "a")
    # a took 10 s for 1 unit of expected cost: b and c (5 units) should take about 50 s
    assert capsys.readouterr().out.splitlines()[-1] == "[demo] a: 0:10 (elapsed 0:10, about 0:50 left)"
    (tmp_path / "b.done").write_text("ok")
    step("b", tmp_path / "b.done", ran.append, "b")  # done before: skipped, and no longer counted as left
    step("c", tmp_path / "c.done", ran.append, "c")  # 110 -> 131
    assert capsys.readouterr().out.splitlines()[-1] == "[demo] c: 0:21 (elapsed 0:31, about 0:00 left)"
    assert ran == ["a", "c"] and step.skipped == ["b"]
    assert json.loads((tmp_path / "timings.json").read_text()) == {"a": 10.0, "c": 21.0}


def test_steps_without_expected_costs_print_elapsed_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(resumable, "time", _Clock(0.0, 0.0, 3725.0, 3725.0))
    Steps(tmp_path, "x")("long", tmp_path / "l.done", lambda: None)
    assert capsys.readouterr().out.splitlines()[-1] == "[x] long: 1:02:05 (elapsed 1:02:05)"
