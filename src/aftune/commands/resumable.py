"""Named steps that run once each, so a killed multi-step command (demo, experiment) resumes where it stopped."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from aftune.io import atomic_write_json


class Steps:
    """Runs named pipeline steps once each: a step whose output exists is skipped (so a killed run
    resumes where it stopped), and the wall time of each step that ran is kept in ROOT/timings.json."""

    def __init__(self, root: Path, label: str, announce_skips: bool = True):
        self.root, self.label, self.announce_skips = Path(root), label, announce_skips
        self.timings: dict[str, float] = self._on_disk()
        self.skipped: list[str] = []

    def _on_disk(self) -> dict[str, float]:
        path = self.root / "timings.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, name: str, done: Path, fn: Callable, *args) -> None:
        if done.exists():
            self.skipped.append(name)
            if self.announce_skips:
                print(f"[{self.label}] {name}: already done ({done})")
            return
        print(f"[{self.label}] {name} ...", flush=True)
        t0 = time.time()
        fn(*args)
        self.record(name, time.time() - t0)

    def record(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 1)
        # merged with what is on disk: processes running other seeds of one experiment share the file
        atomic_write_json(self.root / "timings.json", {**self._on_disk(), **self.timings})


def run_and_mark(run: Callable, cfg) -> None:
    """Run a command whose output file only grows (sample), then write OUT.done: a resumed pipeline must
    tell a finished file from one cut by a kill."""
    run(cfg)
    Path(cfg.out).with_suffix(".done").write_text("ok\n")
