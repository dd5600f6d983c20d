"""Shared fixtures for the robustness suites (crash-resume, bad input, numerical faults, security).

One tiny model is trained once per session through the real CLI (in-process: the pytest process has
already paid for importing torch/transformers, a subprocess would pay again), and one small candidates
file is sampled from it. Tests copy them before changing anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

AFTUNE = Path(sys.executable).with_name("aftune")

# Small enough that a step is milliseconds of compute; the task-args keep the arith splits small too.
TASK_ARGS = "n_train=200,n_validation=20,n_test=20"
TINY = [
    "--model",
    "tiny",
    "--task",
    "arith",
    "--task-args",
    TASK_ARGS,
    "--batch-size",
    "8",
    "--n-validation",
    "8",
    "--tiny-hidden",
    "32",
    "--tiny-layers",
    "1",
    "--tiny-heads",
    "2",
    "--vocab-size",
    "300",
    "--no-eval-accuracy",
    "--quiet",
]
# batch size 1: one append per question, so a kill can land between any two
SAMPLE = [
    "--task-args",
    TASK_ARGS,
    "--k",
    "4",
    "--max-new-tokens",
    "32",
    "--n-questions",
    "12",
    "--batch-size",
    "1",
    "--quiet",
]

# The smallest demo plan that still runs every stage (demo and experiment tests).
TINY_PLAN = dict(
    n_train=120,
    n_validation=12,
    n_test=16,
    n_sample=12,
    n_assess=8,
    k=4,
    vft_steps=12,
    vft_batch=8,
    align_steps=4,
    align_batch=4,
    hidden=32,
    layers=1,
    heads=2,
    vocab=300,
    max_new_tokens=48,
    base="tiny",  # from scratch: seconds, where the shipped base would take minutes
    task_args="max_number=20,min_steps=2,max_steps=3",  # short problems: a seconds-old model gets some right
)


@dataclass
class CliResult:
    code: int
    stderr: str
    stdout: str

    @property
    def error_lines(self) -> list[str]:
        return [l for l in self.stderr.splitlines() if l.startswith("error:")]


def cli(*args: str) -> CliResult:
    """Run `aftune ARGS` in this process exactly as the console script does (aftune.cli.main)."""
    import torch

    from aftune.cli import main

    err, out = io.StringIO(), io.StringIO()
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["aftune", *map(str, args)]
    # One thread: on a shared 2-core machine a tiny model runs ~6x slower with 2 (threads spin-wait),
    # and it matches the killed subprocesses (OMP_NUM_THREADS=1).
    torch.set_num_threads(1)
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return CliResult(code, err.getvalue(), out.getvalue())


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_cli(*args: str, **kw) -> subprocess.Popen:
    """`aftune ARGS` as a real process (for SIGKILL tests and traceback checks)."""
    exe = [str(AFTUNE)] if AFTUNE.exists() else [sys.executable, "-m", "aftune.cli"]  # same main()
    return subprocess.Popen(
        [*exe, *map(str, args)], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def snapshot(path: Path) -> dict[str, str]:
    """Content hash of every file under path (or of path itself): 'untouched' means equal snapshots."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """OUT/sft/model (tiny trained model) and OUT/cands.jsonl (12 questions x k=4), built once."""
    out = tmp_path_factory.mktemp("aft")
    r = cli("sft", *TINY, "--max-steps", "4", "--eval-steps", "4", "--out", out / "sft")
    assert r.code == 0, r.stderr
    r = cli("sample", "--model", out / "sft" / "model", "--out", out / "cands.jsonl", *SAMPLE)
    assert r.code == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def tiny_model(artifacts) -> Path:
    return artifacts / "sft" / "model"


@pytest.fixture
def candidates(artifacts, tmp_path) -> Path:
    """A private copy of the session's candidates file and its meta sidecar."""
    dst = tmp_path / "cands.jsonl"
    shutil.copy(artifacts / "cands.jsonl", dst)
    shutil.copy(artifacts / "cands.jsonl.meta.json", tmp_path / "cands.jsonl.meta.json")
    return dst
