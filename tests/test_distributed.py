"""Distributed training is exact: `accelerate launch` with 2 CPU processes (gloo) and the shipped
configs/accelerate/cpu_gloo_2proc.yaml runs `aftune align` (DPO, so the reference cache is exercised) for
one step, and the saved model equals a one-process run over the same global batch.

The step uses plain SGD without clipping: the parameter change is then lr x gradient, so a mis-scaled
gradient shows (Adam's first step is ~lr*sign(g) and clipping rescales: either would hide it).
This file is also the worker script: `python tests/test_distributed.py --worker ...`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ranks import free_port as _free_port  # test_fsdp / test_deepspeed import it from here

ROOT = Path(__file__).resolve().parents[1]
TASK_ARGS = "n_train=16,n_validation=4,n_test=4"


def _align_cfg(model: str, candidates: str, out: str, batch: int, accum: int, **kw):
    from aftune.config import AlignConfig

    base = dict(
        model=model,
        candidates=candidates,
        out=out,
        method="dpo",
        task="arith",
        task_args=TASK_ARGS,
        n_train=16,
        batch_size=batch,
        grad_accum=accum,
        max_steps=1,
        lr=0.5,
        lr_schedule="constant",
        warmup_ratio=0.0,
        save_steps=1000,
        logging_steps=1,
        quiet=True,
        max_candidates=4,
        max_response_tokens=160,
        resume=False,
        seed=0,
        optim="sgd",
        max_grad_norm=0.0,
    )  # SGD, no clipping
    base.update(kw)
    return AlignConfig(**base)


def _worker(model: str, candidates: str, out: str, batch: int, accum: int, patch=setattr) -> None:
    """One align run that records, per rank: the groups each step scored, the reference log-probs it got,
    and which questions' reference log-probs it computed. `patch` is monkeypatch.setattr when run inside pytest."""
    from transformers import TrainerCallback

    import aftune.distributed as D
    from aftune.commands.align import run_align
    from aftune.training.trainer import AFTTrainer

    computed, seen, refs, engine = [], [], [], set()
    orig_once = D.compute_once_sharded

    def recording_once(path, n, compute_part):
        return orig_once(path, n, lambda idx: computed.extend(idx) or compute_part(idx))

    patch(D, "compute_once_sharded", recording_once)
    orig_terms = AFTTrainer.alignment_terms

    def recording_terms(self, model, groups):
        seen.append([[list(g.prompt), len(g.candidates)] for g in groups])
        # what wraps the model: FSDP2 shards parameters as DTensors
        engine.add(f"{self.accelerator.distributed_type.value}/{type(next(model.parameters())).__name__}")
        return orig_terms(self, model, groups)

    patch(AFTTrainer, "alignment_terms", recording_terms)

    class RecordReferences(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            refs.extend(it.ref_logps for it in train_dataloader.dataset.items)

    run_align(_align_cfg(model, candidates, out, batch, accum), callbacks=[RecordReferences()])
    rank, world = D.rank_and_world()
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"world": world, "computed": computed, "seen": seen, "ref": refs, "engine": sorted(engine)})
    )


# ------------------------------------------------------------------------------------------- fixtures


def _make_inputs(tmp: Path) -> tuple[Path, Path]:
    """A tiny Llama (hidden 32, 1 layer) and a candidates file over the first 16 arith questions, with
    2-4 candidates of different lengths (so NLL token counts and group sizes differ between ranks)."""
    from aftune.config import parse_task_args
    from aftune.io import write_jsonl
    from aftune.modeling import create_tiny
    from aftune.tasks import get_tasks

    task = get_tasks("arith", parse_task_args(TASK_ARGS))[0]
    train = task.load("train")
    model = create_tiny(
        tmp / "model",
        [task.prompt(e) + e.reference for e in train],
        vocab_size=300,
        hidden_size=32,
        n_layers=1,
        n_heads=2,
    )
    groups = []
    for i, e in enumerate(train):
        body, _ = e.reference.rsplit("####", 1)
        cands = [
            {"text": e.reference, "answer": e.answer, "correct": True, "rank": 0},
            {"text": f"{body}#### {int(float(e.answer)) + 1 + i}", "answer": "x", "correct": False, "rank": 1},
        ]
        if i % 3:
            cands.append({"text": body.split("\n")[0], "answer": None, "correct": False, "rank": 2})
        groups.append(
            {
                "id": e.id,
                "task": "arith",
                "prompt": task.prompt(e),
                "reference": e.reference,
                "answer": e.answer,
                "candidates": cands,
            }
        )
    cand = tmp / "cands.jsonl"
    write_jsonl(cand, groups)
    return model, cand


def _copy_candidates(cand: Path, dest: Path) -> Path:
    # each run gets its own folder: the reference cache lives next to the candidates file
    dest.mkdir(parents=True)
    (dest / cand.name).write_bytes(cand.read_bytes())
    return dest / cand.name


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------- tests


def test_two_processes_one_step_equals_one_process(tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    model, cand = _make_inputs(tmp_path)
    c2, c1 = _copy_candidates(cand, tmp_path / "c2"), _copy_candidates(cand, tmp_path / "c1")
    # 2 processes x 2 questions x 2 accumulation steps == 1 process x 8 questions
    two = _launch(__file__, "--worker", str(model), str(c2), str(tmp_path / "two"), "2", "2")
    try:  # meanwhile, the one-process run here
        _worker(str(model), str(c1), str(tmp_path / "one"), 8, 1, monkeypatch.setattr)
    except BaseException:
        _kill_tree(two)
        raise
    _finish(two, timeout=150)

    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert (r0["world"], r1["world"], single["world"]) == (2, 2, 1)
    assert r0["engine"] == r1["engine"] == ["MULTI_CPU/Parameter"]  # gloo DDP, as the config asks

    # reference log-probs: each question scored once (each rank its half), file written once (main),
    # all values on both ranks, identical to one process's
    assert (r0["computed"], r1["computed"], single["computed"]) == (
        list(range(0, 16, 2)),
        list(range(1, 16, 2)),
        list(range(16)),
    )
    assert len(list((tmp_path / "c2").glob("reflogps-*.json"))) == 1
    assert r0["ref"] == r1["ref"] and len(r0["ref"]) == 16
    # (summed log-probs, about -800: batches padded to other widths differ in the 7th digit)
    torch.testing.assert_close(
        torch.tensor([x for v in r0["ref"] for x in v], dtype=torch.float64),
        torch.tensor([x for v in single["ref"] for x in v], dtype=torch.float64),
        rtol=1e-6,
        atol=1e-5,
    )

    # the same 8 questions, each whole on one rank, none on both; 2 micro-batches of 2 per rank
    assert [len(b) for b in r0["seen"]] == [2, 2] and [len(b) for b in r1["seen"]] == [2, 2]
    assert [len(b) for b in single["seen"]] == [8]
    key = lambda g: (tuple(g[0]), g[1])  # noqa: E731  (prompt ids, number of candidates)
    on0 = {key(g) for b in r0["seen"] for g in b}
    on1 = {key(g) for b in r1["seen"] for g in b}
    assert not on0 & on1 and len(on0) == len(on1) == 4
    assert on0 | on1 == {key(g) for g in single["seen"][0]}
    assert {n for _, n in on0 | on1} >= {3, 4}  # groups of different sizes were in the step

    # one optimisation step: the same parameters
    init, p2, p1 = _load(model), _load(tmp_path / "two" / "model"), _load(tmp_path / "one" / "model")
    assert p2.keys() == p1.keys()
    moved = max((p1[k] - init[k]).abs().max().item() for k in p1)
    assert moved > 1e-3  # the step did something
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=1e-5, msg=k)


def test_accumulation_and_resume_are_exact(tmp_path, monkeypatch):
    """One process: 2 accumulation steps of 4 questions == one batch of 8 == the same with gradient
    checkpointing; and 1 step + resume from its checkpoint == 2 steps straight (Trainer restores weights,
    optimiser and data position)."""
    import torch

    from aftune.commands.align import run_align

    torch.set_num_threads(1)
    model, cand = _make_inputs(tmp_path)
    cfg = lambda out, batch, accum, **kw: _align_cfg(str(model), str(cand), str(tmp_path / out), batch, accum, **kw)  # noqa: E731
    run_align(cfg("ga", 4, 2))
    run_align(cfg("big", 8, 1))
    run_align(cfg("ckpt", 8, 1, gradient_checkpointing=True))  # recomputes; the prompt is not shared then
    ga, big, ckpt = (_load(tmp_path / d / "model") for d in ("ga", "big", "ckpt"))
    for k in big:
        torch.testing.assert_close(ga[k], big[k], rtol=0, atol=1e-5, msg=k)
        torch.testing.assert_close(ckpt[k], big[k], rtol=0, atol=1e-5, msg=k)

    run_align(cfg("straight", 4, 1, max_steps=2, lr=0.2))
    run_align(cfg("resumed", 4, 1, max_steps=1, lr=0.2, save_steps=1))
    run_align(cfg("resumed", 4, 1, max_steps=2, lr=0.2, save_steps=1, resume=True))
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    a, b, one_step = (
        _load(tmp_path / "straight" / "model"),
        _load(tmp_path / "resumed" / "model"),
        _load(tmp_path / "resumed" / "checkpoints" / "checkpoint-1"),
    )
    assert max((a[k] - one_step[k]).abs().max().item() for k in a) > 1e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def _launch(*argv: str) -> subprocess.Popen:
    """`accelerate launch` of ARGV (a script or `-m module`, and its arguments) as 2 gloo processes with
    the shipped CPU config; output captured. `_finish` waits for it, `_kill_tree` kills all of it."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [
            str(accelerate),
            "launch",
            "--config_file",
            str(ROOT / "configs/accelerate/cpu_gloo_2proc.yaml"),
            "--main_process_port",
            str(_free_port()),
            *argv,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker (torch's elastic agent starts workers in their own sessions,
    so killing the launcher's process group would leave them running)."""
    import psutil  # an accelerate dependency

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in reversed(procs):  # workers first
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert proc.returncode == 0, out[-5000:]
    return out


def test_kill_under_accelerate_launch_resumes_to_the_straight_run(tmp_path):
    """SIGKILL to the whole `accelerate launch` (launcher + 2 ranks) just after a checkpoint; launching the same
    command again resumes from it (weights, AdamW state, data position, per rank) and ends where an
    uninterrupted 2-process run ends."""
    import torch

    model, cand = _make_inputs(tmp_path)
    args = lambda out: [
        "--model",
        str(model),
        "--candidates",
        str(cand),
        "--out",
        str(tmp_path / out),  # noqa: E731
        "--method",
        "bc",
        "--task",
        "arith",
        "--task-args",
        TASK_ARGS,
        "--n-train",
        "16",
        "--batch-size",
        "2",
        "--max-steps",
        "6",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
        "--lr",
        "0.01",
        "--max-candidates",
        "4",
        "--quiet",
    ]
    _finish(_launch("-m", "aftune.cli", "align", *args("straight")))

    crash = _launch("-m", "aftune.cli", "align", *args("crash"))
    marker = tmp_path / "crash" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 240
    while not marker.exists() and crash.poll() is None and time.time() < deadline:
        time.sleep(0.002)  # a step takes ~60 ms here: the kill lands a few ms after the save
    _kill_tree(crash)
    log, _ = crash.communicate()
    assert marker.exists() and not (tmp_path / "crash" / "metrics.json").exists(), (
        "not killed mid-run:\n" + log[-3000:]
    )

    log = _finish(_launch("-m", "aftune.cli", "align", *args("crash")))
    assert "aftune: resuming from" in log
    assert 1 <= log.count("{'loss'") < 6  # only the steps after the checkpoint ran again
    straight, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "crash"))
    assert resumed["steps"] == straight["steps"] == 6
    losses = lambda m: {e["step"]: e["loss"] for e in m["log_history"] if "loss" in e}  # noqa: E731
    assert losses(resumed).keys() == losses(straight).keys() == set(range(1, 7))
    for step, value in losses(straight).items():
        assert losses(resumed)[step] == pytest.approx(value, rel=1e-4), step
    a, b, init = _load(tmp_path / "straight" / "model"), _load(tmp_path / "crash" / "model"), _load(model)
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compute_once_single_process(tmp_path):
    from aftune.distributed import compute_once

    calls = []
    path = tmp_path / "v.json"
    assert compute_once(path, lambda: calls.append(1) or [[1.5, -2.0]]) == [[1.5, -2.0]]
    assert compute_once(path, lambda: calls.append(1) or [[9.0]]) == [[1.5, -2.0]]  # read back, not recomputed
    assert calls == [1] and json.loads(path.read_text()) == [[1.5, -2.0]]


def test_env_shard(monkeypatch):
    from aftune.distributed import env_shard

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert env_shard() == ""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert env_shard() == "3/4"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert env_shard() == ""


def test_shipped_accelerate_configs_parse():
    """Every shipped config loads as an accelerate config, with the settings the docs promise."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfgs = {p.stem: load_config_from_file(str(p)) for p in (ROOT / "configs/accelerate").glob("*.yaml")}
    assert {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node", "cpu_gloo_2proc"} <= cfgs.keys()
    assert cfgs["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3
    assert cfgs["deepspeed_zero3"].deepspeed_config["zero3_save_16bit_model"] is True  # save_model gathers
    assert cfgs["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert cfgs["fsdp"].fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert cfgs["multi_node"].num_machines > 1
    for name in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node"):
        assert cfgs[name].mixed_precision == "bf16", name


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
