"""FSDP2 training is exact: `accelerate launch` with configs/accelerate/cpu_gloo_fsdp2_2proc.yaml (2 CPU processes,
gloo, accelerate's own FSDP2 code: `fully_shard` per decoder layer, sharded optimiser states, FULL_STATE_DICT saving;
attached on CPU by aftune.training.fsdp) runs `aftune align` (DPO: reference log-probs; BC: none) and `aftune sft`,
and each gives the per-step losses and final weights of one plain process over the same global batch. A run
SIGKILLed after a checkpoint resumes to the uninterrupted run's weights, and OUT/model loads with from_pretrained.

Tolerances (fp32): weights 1e-5 absolute after 3 SGD steps at lr 0.5 (plain SGD without clipping, so a mis-scaled
gradient would show; measured max difference ~5e-7), per-step losses 1e-5 relative. The scoring runs its fast path
under FSDP2 (chunked head, packed candidates), checked per rank.
This file is also the worker script: `python tests/test_fsdp.py --worker KIND MODEL CANDIDATES OUT BATCH`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import (
    TASK_ARGS,
    _align_cfg,
    _copy_candidates,
    _finish,
    _free_port,
    _kill_tree,
    _load,
    _make_inputs,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/accelerate/cpu_gloo_fsdp2_2proc.yaml"
STEPS = 3


def _sft_cfg(model: str, out: str, batch: int):
    from aftune.config import SFTConfig

    return SFTConfig(
        model=model,
        out=out,
        task="arith",
        task_args=TASK_ARGS,
        n_train=16,
        n_validation=4,
        eval_steps=STEPS,  # one evaluation and checkpoint, at the end: the best model is reloaded from it
        save_steps=STEPS,
        max_steps=STEPS,
        batch_size=batch,
        grad_accum=1,
        lr=0.5,
        lr_schedule="constant",
        warmup_ratio=0.0,
        logging_steps=1,
        quiet=True,
        eval_accuracy=False,
        max_response_tokens=160,
        resume=False,
        seed=0,
        optim="sgd",
        max_grad_norm=0.0,
    )


def _worker(kind: str, model: str, cands: str, out: str, batch: int, patch=setattr) -> None:
    """One run of `kind` (align-dpo, align-bc, sft) recording per rank: the engine, whether the parameters are
    FSDP2 shards, the scoring path taken, and the logged per-step losses. `patch` is monkeypatch.setattr when
    run inside pytest (undone after the test)."""
    from transformers import TrainerCallback

    import aftune.scoring as sc
    from aftune.commands.align import run_align
    from aftune.commands.sft import run_sft
    from aftune.distributed import rank_and_world
    from aftune.training.trainer import AFTTrainer

    rec = {"engine": set(), "dtensor": False, "chunks": 0, "full_logits": 0, "losses": {}}
    real_chunk, real_token = sc._chunk_logps, sc._token_logps
    patch(sc, "_chunk_logps", lambda *a, **k: rec.__setitem__("chunks", rec["chunks"] + 1) or real_chunk(*a, **k))
    patch(
        sc,
        "_token_logps",
        lambda *a, **k: rec.__setitem__("full_logits", rec["full_logits"] + 1) or real_token(*a, **k),
    )

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            from torch.distributed.tensor import DTensor

            trainer_model = kwargs.get("model", model)
            rec["dtensor"] |= any(isinstance(p, DTensor) for p in trainer_model.parameters())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                rec["losses"][state.global_step] = float(logs["loss"])

    orig_init = AFTTrainer.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self.add_callback(Record())
        rec["engine"].add(self.accelerator.distributed_type.value)

    patch(AFTTrainer, "__init__", init)
    if kind == "sft":
        run_sft(_sft_cfg(model, out, batch))
    else:
        cfg = _align_cfg(model, cands, out, batch, 1, method=kind.split("-")[1], max_steps=STEPS)
        run_align(cfg)
    rank, world = rank_and_world()
    rec["engine"] = sorted(rec["engine"])
    Path(out, f"rank{rank}.json").write_text(json.dumps({"world": world, **rec}))


def _launch(*argv: str) -> subprocess.Popen:
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(accelerate), "launch", "--config_file", str(CONFIG), "--main_process_port", str(_free_port()), *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_and_one(tmp: Path, kind: str, model: Path, cands: Path, patch) -> tuple[list[dict], dict]:
    """2 FSDP2 processes x 2 per process (launched) and, meanwhile, 1 plain process x 4 (here)."""
    c2, c1 = _copy_candidates(cands, tmp / f"c2-{kind}"), _copy_candidates(cands, tmp / f"c1-{kind}")
    two = _launch(__file__, "--worker", kind, str(model), str(c2), str(tmp / f"two-{kind}"), "2")
    try:
        _worker(kind, str(model), str(c1), str(tmp / f"one-{kind}"), 4, patch)
    except BaseException:
        _kill_tree(two)
        raise
    _finish(two, timeout=200)
    ranks = [json.loads((tmp / f"two-{kind}" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, json.loads((tmp / f"one-{kind}" / "rank0.json").read_text())


def _same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    import torch

    # FSDP's full state dict also names a tied head (lm_head.weight); save_pretrained of one process leaves it out
    assert set(b) <= set(a) and set(a) - set(b) <= {"lm_head.weight"}
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# BC (no reference) also runs in the kill-and-resume test below; its one-process equivalence is the slow case
@pytest.mark.parametrize("kind", ["align-dpo", "sft", pytest.param("align-bc", marks=pytest.mark.slow)])
def test_fsdp2_two_processes_equal_one_process(kind, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model, cands = _make_inputs(tmp_path)
    (r0, r1), one = _two_and_one(tmp_path, kind, model, cands, monkeypatch.setattr)
    assert (r0["world"], r1["world"], one["world"]) == (2, 2, 1)
    assert r0["engine"] == r1["engine"] == ["FSDP"] and r0["dtensor"] and r1["dtensor"]  # sharded, not DDP
    assert one["engine"] == ["NO"] and not one["dtensor"]
    if kind != "sft":  # the alignment term scored on the fast path on every rank, never the full logits
        for r in (r0, r1, one):
            assert r["chunks"] > 0 and r["full_logits"] == 0, r
    steps = {str(s) for s in range(1, STEPS + 1)}
    assert r0["losses"].keys() == one["losses"].keys() == steps
    for s in steps:
        assert r0["losses"][s] == pytest.approx(one["losses"][s], rel=1e-5), s

    init, two_w, one_w = (
        _load(model),
        _load(tmp_path / f"two-{kind}" / "model"),
        _load(tmp_path / f"one-{kind}" / "model"),
    )
    assert max((one_w[k] - init[k]).abs().max().item() for k in one_w) > 1e-3  # the steps did something
    _same_weights(two_w, one_w)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / f"two-{kind}" / "model"))
    _same_weights({k: v for k, v in loaded.state_dict().items()}, one_w)


def test_cpu_config_is_fsdp_yaml_on_two_cpu_processes():
    """The config the tests launch differs from the shipped GPU one only in where it runs, so what they verify
    is fsdp.yaml's FSDP2 setup (precision aside: fp32 here, for exact comparisons)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cpu, gpu = (load_config_from_file(str(p)) for p in (CONFIG, ROOT / "configs/accelerate/fsdp.yaml"))
    assert cpu.distributed_type == gpu.distributed_type == "FSDP"
    assert cpu.fsdp_config == gpu.fsdp_config and cpu.fsdp_config["fsdp_version"] == 2
    assert (cpu.use_cpu, cpu.num_processes, cpu.mixed_precision) == (True, 2, "no")


def _python_api_run(model: str, cands: str, out: str, batch: int, fsdp: bool) -> None:
    """AFTTrainer from Python, FSDP2 asked for in AFTConfig (TrainingArguments.fsdp), TRL-style rows."""
    from torch.distributed.tensor import DTensor

    from aftune import AFTConfig, AFTTrainer
    from aftune.distributed import rank_and_world

    rows = [
        {"prompt": g["prompt"], "completion": c["text"], "label": bool(c["correct"])}
        for g in map(json.loads, Path(cands).read_text().splitlines())
        for c in g["candidates"]
    ]
    extra = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}} if fsdp else {}
    args = AFTConfig(
        output_dir=out,
        method="bc",
        max_steps=2,
        per_device_train_batch_size=batch,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_candidates=4,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        **extra,
    )
    trainer = AFTTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    rank, world = rank_and_world()
    sharded = any(isinstance(p, DTensor) for p in trainer.model.parameters())
    trainer.save_model(str(Path(out) / "model"))
    engine = {"world": world, "type": trainer.accelerator.distributed_type.value, "dtensor": sharded}
    Path(out, f"rank{rank}.json").write_text(json.dumps(engine))


@pytest.mark.slow  # the default suite covers AFTTrainer through `aftune align` / `sft`; this adds the AFTConfig route
def test_fsdp2_from_python_aft_config(tmp_path):
    """`AFTConfig(fsdp="full_shard", fsdp_config={"fsdp_version": 2})` under torchrun on CPU processes trains with
    FSDP2 (accelerate drops that plugin on CPU too) and equals one plain process over the same global batch."""
    import torch

    torch.set_num_threads(1)
    model, cands = _make_inputs(tmp_path)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out2, out1 = tmp_path / "two", tmp_path / "one"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), __file__, "--python-api"]
    two = subprocess.Popen(
        [*cmd, str(model), str(cands), str(out2), "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _python_api_run(str(model), str(cands), str(out1), 4, fsdp=False)
    except BaseException:
        _kill_tree(two)
        raise
    _finish(two, timeout=200)
    for r in (0, 1):
        assert json.loads((out2 / f"rank{r}.json").read_text()) == {"world": 2, "type": "FSDP", "dtensor": True}
    assert json.loads((out1 / "rank0.json").read_text()) == {"world": 1, "type": "NO", "dtensor": False}
    one_w, init = _load(out1 / "model"), _load(model)
    assert max((one_w[k] - init[k]).abs().max().item() for k in init) > 1e-3
    _same_weights(_load(out2 / "model"), one_w)


def _cli_args(model: Path, cands: Path, out: Path) -> list[str]:
    return [
        *("--model", str(model), "--candidates", str(cands), "--out", str(out), "--method", "bc"),
        *("--task", "arith", "--task-args", TASK_ARGS, "--n-train", "16", "--batch-size", "2"),
        *("--max-steps", "4", "--save-steps", "1", "--logging-steps", "1", "--lr", "0.01", "--max-candidates", "4"),
        "--quiet",
    ]


def test_fsdp2_kill_resumes_to_the_straight_run(tmp_path):
    """SIGKILL to the whole FSDP2 launch just after checkpoint 2; the same command again resumes from the sharded
    checkpoint (weights, AdamW state, data position) and ends with the straight run's losses and weights."""
    import torch

    model, cands = _make_inputs(tmp_path)
    straight = _launch("-m", "aftune.cli", "align", *_cli_args(model, cands, tmp_path / "straight"))
    crash = _launch("-m", "aftune.cli", "align", *_cli_args(model, cands, tmp_path / "crash"))
    marker = tmp_path / "crash" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 200
    while not marker.exists() and crash.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    _kill_tree(crash)
    log, _ = crash.communicate()
    assert marker.exists() and not (tmp_path / "crash" / "metrics.json").exists(), (
        "not killed mid-run:\n" + log[-3000:]
    )
    _finish(straight)

    log = _finish(_launch("-m", "aftune.cli", "align", *_cli_args(model, cands, tmp_path / "crash")))
    assert "aftune: resuming from" in log
    assert 1 <= log.count("{'loss'") < 4  # only the steps after the checkpoint ran again
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "crash"))
    losses = lambda m: {e["step"]: e["loss"] for e in m["log_history"] if "loss" in e}  # noqa: E731
    assert losses(a).keys() == losses(b).keys() == set(range(1, 5))
    for step, value in losses(a).items():
        assert losses(b)[step] == pytest.approx(value, rel=1e-5), step
    wa, wb, init = _load(tmp_path / "straight" / "model"), _load(tmp_path / "crash" / "model"), _load(model)
    assert max((wa[k] - init[k]).abs().max().item() for k in init) > 1e-3
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
elif __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--python-api":
    _python_api_run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), fsdp=True)
