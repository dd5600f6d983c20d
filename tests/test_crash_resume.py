"""Kill `aftune sample`, `aftune sft` and `aftune align` with SIGKILL at seeded random points, resume, and
check nothing was lost or duplicated and the result equals an uninterrupted run.

The killed runs are real processes (a SIGKILL cannot be simulated in-process); the uninterrupted
references and the final resumes run in-process through the same CLI entry point, which is cheaper.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, TINY, cli, start_cli
from safetensors.torch import load_file

from aftune.commands.training import resume_point
from aftune.config import AlignConfig

N_QUESTIONS = 12  # as in conftest.SAMPLE


def _complete_lines(path: Path) -> bytes:
    data = path.read_bytes() if path.exists() else b""
    return data[: data.rfind(b"\n") + 1]


def _n_lines(path: Path) -> int:
    return _complete_lines(path).count(b"\n")


def _kill_when(proc, ready, rng: random.Random, max_delay: float, timeout: float = 120.0) -> bool:
    """SIGKILL proc a random moment (up to max_delay s) after ready() turns true; False if it finished first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() - t0 < timeout, "the run never reached the kill point"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, max_delay))
    finished = proc.poll() is not None
    proc.kill()
    proc.communicate()
    return not finished


def _records(path: Path) -> dict[str, bytes]:
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the file must end with a complete line"
    out = {}
    for raw in lines[:-1]:
        gid = json.loads(raw)["id"]  # every line parses: no torn record survives a resume
        assert gid not in out, f"question {gid} written twice"
        out[gid] = raw
    return out


def test_sample_killed_repeatedly_resumes_to_the_uninterrupted_file(tiny_model, artifacts, tmp_path):
    rng = random.Random(1234)
    out = tmp_path / "crash.jsonl"
    expected = _records(artifacts / "cands.jsonl")  # the same command, never interrupted
    assert len(expected) == N_QUESTIONS

    kept, cut_short = b"", 0
    for _ in range(3):  # each killed run also resumes the previous one's partial file
        target = _n_lines(out) + rng.randint(1, 3)
        proc = start_cli("sample", "--model", tiny_model, "--out", out, *SAMPLE)
        # a question takes ~16 ms on an idle 2-core host: a longer delay lets the run finish before the kill
        _kill_when(proc, lambda: _n_lines(out) >= target, rng, max_delay=0.03)
        data = out.read_bytes()
        assert data.startswith(kept), "records finished before a kill changed after resuming"
        kept = _complete_lines(out)
        cut_short += _n_lines(out) < N_QUESTIONS
        json.loads((tmp_path / "crash.jsonl.meta.json").read_text())  # the sidecar is never torn
    assert cut_short >= 2, "the kills came too late to interrupt sampling"

    r = cli("sample", "--model", tiny_model, "--out", out, *SAMPLE)
    assert r.code == 0, r.stderr
    assert out.read_bytes().startswith(kept)
    got = _records(out)
    assert set(got) == set(expected)  # every question exactly once
    assert got == expected  # same seeds per question: identical to the uninterrupted run
    meta = json.loads((tmp_path / "crash.jsonl.meta.json").read_text())
    assert meta["status"] == "complete" and meta["stats"]["questions"] == N_QUESTIONS


def test_sample_torn_last_line_is_dropped_and_redone(tiny_model, artifacts, tmp_path):
    out = tmp_path / "torn.jsonl"
    shutil.copy(artifacts / "cands.jsonl.meta.json", tmp_path / "torn.jsonl.meta.json")
    full = (artifacts / "cands.jsonl").read_bytes()
    head = _complete_lines_before_last(full)
    out.write_bytes(head + full[len(head) : len(head) + 40])  # a kill inside the last append
    r = cli("sample", "--model", tiny_model, "--out", out, *SAMPLE)
    assert r.code == 0, r.stderr
    assert out.read_bytes() == full


def _complete_lines_before_last(data: bytes) -> bytes:
    return data[: data.rstrip(b"\n").rfind(b"\n") + 1]


def _params(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _losses(metrics: dict, key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in metrics["log_history"] if key in e}


def _tear_next_checkpoint(ckpt_dir: Path) -> Path:
    """Fake a kill inside Trainer._save_checkpoint: the newest folder has weights but no trainer state."""
    newest = max(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    torn = ckpt_dir / f"checkpoint-{int(newest.name.split('-')[1]) + 100}"
    shutil.copytree(newest, torn)  # newest may itself be torn, when the kill landed inside a save
    (torn / "trainer_state.json").unlink(missing_ok=True)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if weights.exists() else b"")
    return torn


def _assert_same_run(ref: Path, got: Path, keys: tuple[str, ...]) -> None:
    mr, mg = (json.loads((d / "metrics.json").read_text()) for d in (ref, got))
    assert mg["steps"] == mr["steps"]
    for key in keys:
        lr, lg = _losses(mr, key), _losses(mg, key)
        assert lr and lr.keys() == lg.keys(), key
        for step in lr:
            assert lg[step] == pytest.approx(lr[step], rel=1e-4, abs=1e-5), (key, step)
    pr, pg = _params(ref / "model"), _params(got / "model")
    assert pr.keys() == pg.keys()
    for name in pr:
        torch.testing.assert_close(pg[name], pr[name], rtol=1e-4, atol=1e-5, msg=name)


def _train_killed_then_resumed(args: list, tmp_path: Path, rng: random.Random, kill_after_steps: list[int]):
    ref, out = tmp_path / "ref", tmp_path / "crash"
    r = cli(*args, "--out", ref)
    assert r.code == 0, r.stderr
    ckpt = out / "checkpoints"
    # A random moment after a random checkpoint: mostly between two saves, sometimes inside one.
    kill_after = ckpt / f"checkpoint-{rng.choice(kill_after_steps)}" / "trainer_state.json"
    proc = start_cli(*args, "--out", out)
    assert _kill_when(proc, kill_after.exists, rng, max_delay=0.15), "the run finished before it could be killed"
    assert not (out / "metrics.json").exists(), "killed too late to test resuming"
    torn = _tear_next_checkpoint(ckpt)
    r = cli(*args, "--out", out)
    assert r.code == 0, r.stderr
    assert "removing incomplete checkpoint" in r.stderr and not torn.exists()
    return ref, out


def test_align_killed_between_checkpoints_resumes_to_the_same_model(tiny_model, candidates, tmp_path):
    args = [
        "align",
        "--model",
        tiny_model,
        "--candidates",
        candidates,
        "--task-args",
        "n_train=200",
        "--method",
        "bc",
        "--max-steps",
        "14",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--batch-size",
        "2",
        "--quiet",
    ]
    ref, out = _train_killed_then_resumed(args, tmp_path, random.Random(7), kill_after_steps=[2, 4])
    _assert_same_run(ref, out, ("loss", "align_loss"))


def test_sft_killed_between_checkpoints_resumes_to_the_same_model(tmp_path):
    # 20 steps: the 16+ left after the kill point outlast the random delay even on a fast host
    args = ["sft", *TINY, "--max-steps", "20", "--eval-steps", "2", "--logging-steps", "1"]
    ref, out = _train_killed_then_resumed(args, tmp_path, random.Random(11), kill_after_steps=[2, 4])
    _assert_same_run(ref, out, ("loss", "eval_loss"))
    mr, mg = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    assert mg["best_eval_loss"] == pytest.approx(mr["best_eval_loss"], rel=1e-5)


def test_resume_point_skips_torn_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        d = ckpt / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpt / "checkpoint-6").mkdir()  # killed before its state was written
    (ckpt / "checkpoint-8").mkdir()
    (ckpt / "checkpoint-8" / "trainer_state.json").write_text('{"global_step": 8, "log_hi')  # torn write
    cfg = AlignConfig()
    assert resume_point(cfg, ckpt) == str(ckpt / "checkpoint-4")
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    cfg.resume = False
    assert resume_point(cfg, ckpt) is None
    assert resume_point(AlignConfig(), tmp_path / "absent") is None


def test_kill_after_the_final_checkpoint_restores_instead_of_stepping_again(tmp_path):
    # transformers resumes a checkpoint at max_steps by running one more step; aftune restores it instead
    args = ["sft", *TINY, "--max-steps", "4", "--eval-steps", "2", "--logging-steps", "1", "--out", tmp_path / "r"]
    assert cli(*args).code == 0
    ref = (tmp_path / "r" / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "r" / "model")
    (tmp_path / "r" / "metrics.json").unlink()  # as if killed between the last save and the outputs
    r = cli(*args)
    assert r.code == 0, r.stderr
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["steps"] == 4 and max(_losses(m, "loss")) == 4
    assert (tmp_path / "r" / "model" / "model.safetensors").read_bytes() == ref
