"""Named steps that run once each, so a killed multi-step command (demo, experiment) resumes where it stopped."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from aftune.io import atomic_write_json


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Steps:
    """Runs named pipeline steps once each: a step whose output exists is skipped (so a killed run
    resumes where it stopped), and the wall time of each step that ran is kept in ROOT/timings.json.

    `expected`: each step's relative cost (e.g. seconds measured on some host). After every step the runner
    then prints the elapsed time and an estimate of the time left: this host's pace on the steps it ran,
    times the expected cost of the steps still to come (a slower host scales the whole table)."""

    def __init__(self, root: Path, label: str, announce_skips: bool = True, expected: dict[str, float] | None = None):
        self.root, self.label, self.announce_skips = Path(root), label, announce_skips
        self.timings: dict[str, float] = self._on_disk()
        self.skipped: list[str] = []
        self.expected = dict(expected or {})
        self._ran: dict[str, float] = {}  # this process's steps: their wall time
        self._start = time.time()

    def _on_disk(self) -> dict[str, float]:
        path = self.root / "timings.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, name: str, done: Path, fn: Callable, *args) -> None:
        if done.exists():
            self.skipped.append(name)
            self.expected.pop(name, None)  # nothing left to do there
            if self.announce_skips:
                print(f"[{self.label}] {name}: already done ({done})")
            return
        print(f"[{self.label}] {name} ...", flush=True)
        t0 = time.time()
        fn(*args)
        seconds = time.time() - t0
        self.record(name, seconds)
        self._ran[name] = seconds
        print(f"[{self.label}] {name}: {_clock(seconds)}{self.progress()}", flush=True)

    def progress(self) -> str:
        """'(elapsed M:SS, about M:SS left)' from the expected costs; '' without them."""
        done = sum(self.expected.get(n, 0.0) for n in self._ran)
        left = sum(c for n, c in self.expected.items() if n not in self._ran)
        elapsed = time.time() - self._start
        if not self.expected or done <= 0:
            return f" (elapsed {_clock(elapsed)})"
        pace = sum(t for n, t in self._ran.items() if n in self.expected) / done
        return f" (elapsed {_clock(elapsed)}, about {_clock(pace * left)} left)"

    def record(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 1)
        # merged with what is on disk: processes running other seeds of one experiment share the file
        atomic_write_json(self.root / "timings.json", {**self._on_disk(), **self.timings})


def run_and_mark(run: Callable, cfg) -> None:
    """Run a command whose output file only grows (sample), then write OUT.done: a resumed pipeline must
    tell a finished file from one cut by a kill."""
    run(cfg)
    Path(cfg.out).with_suffix(".done").write_text("ok\n")
