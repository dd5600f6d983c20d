"""DeepSpeed ZeRO-2 and ZeRO-3 through `transformers.Trainer`, as users run it, on CPU with two processes.

`torchrun --nproc_per_node 2` starts two CPU processes; `--deepspeed configs/deepspeed/zero{2,3}.json` (the
shipped configs, `auto` values filled by the Trainer) selects DeepSpeed's engine, on its CPU accelerator with a
gloo process group. One launch per stage runs, in each process: `aftune align` with DPO (full fine-tuning), with
BC under LoRA, `aftune sft`, `AFTTrainer` from Python, and a run where only rank 1's loss turns NaN. The pytest
process meanwhile runs the same align / sft runs in one plain process on the same global batch, and the test
compares: per-step losses and final weights, the compute counters, the DPO reference against the policy's own
scores at step 0. A second launch is SIGKILLed after a checkpoint and a third resumes it.

As in tests/test_distributed.py the steps use plain SGD without clipping (DeepSpeed is given the Trainer's
optimizer; `gradient_clipping` is `auto` = max_grad_norm = 0): the update is lr x gradient, so a mis-scaled
gradient shows. This file is also the worker script: `python tests/test_deepspeed.py --worker CONFIG MODEL CANDS OUT`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import (  # noqa: E402  (the DDP test's fixtures: tiny Llama, candidates, SGD config)
    TASK_ARGS,
    _align_cfg,
    _copy_candidates,
    _free_port,
    _kill_tree,
    _load,
    _make_inputs,
)

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {stage: ROOT / f"configs/deepspeed/zero{stage}.json" for stage in (2, 3)}
LORA = dict(lora_r=4, lora_alpha=8, lora_targets="q_proj,v_proj")
# the step sizes: 3 SGD steps at lr 0.5 (full) move the weights by ~1e-1; ZeRO reduces gradients in another order
# than one process sums them, so float32 rounding differs: weights within 1e-5, losses within 1e-5 relative
ATOL, RTOL = 1e-5, 1e-5


def _sft_cfg(model: str, out: str, batch: int, accum: int, **kw):
    from aftune.config import SFTConfig

    base = dict(
        model=model,
        out=out,
        task="arith",
        task_args=TASK_ARGS,
        n_train=16,
        n_validation=4,
        batch_size=batch,
        grad_accum=accum,
        max_steps=2,
        eval_steps=2,
        lr=0.5,
        lr_schedule="constant",
        warmup_ratio=0.0,
        logging_steps=1,
        quiet=True,
        max_response_tokens=160,
        resume=False,
        seed=0,
        optim="sgd",
        max_grad_norm=0.0,
        eval_accuracy=False,
    )
    base.update(kw)
    return SFTConfig(**base)


def _runs(model: str, cand_dir: Path, out: Path, batch: int, accum: int, deepspeed: str | None) -> None:
    """The align / sft runs the equivalence compares, each with its own candidates copy (its reference cache)."""
    from aftune.commands.align import run_align
    from aftune.commands.sft import run_sft

    cand = cand_dir / "cands.jsonl"
    run_align(_align_cfg(model, str(cand), str(out / "dpo"), batch, accum, max_steps=3, deepspeed=deepspeed))
    lora = _align_cfg(model, str(cand), str(out / "lora"), batch, accum, method="bc", max_steps=2, **LORA)
    lora.deepspeed = deepspeed
    run_align(lora)
    # greedy accuracy: the main process alone reads the saved model back (whole, also under ZeRO-3)
    run_sft(_sft_cfg(model, str(out / "sft"), batch, accum, deepspeed=deepspeed, eval_accuracy=deepspeed is not None))


def _worker(config: str, model: str, cand_dir: str, out: str) -> None:
    """One process of the ZeRO launch: the compared runs, recording what the engine did; then AFTTrainer from
    Python; then a run where only rank 1's loss becomes NaN (both ranks must raise TrainingDiverged)."""
    import torch

    import aftune.training.trainer as T
    from aftune.distributed import barrier, rank_and_world

    out = Path(out)
    rec: dict = {"step0": [], "engine": [], "loaded_partitioned": [], "logs": {}}
    orig_digest, orig_refs, orig_batch = (
        T.weights_digest,
        T.AFTTrainer._compute_references,
        T.AFTTrainer.candidate_batch,
    )

    def digest(model):  # AFTTrainer's first look at the model it was given: partitioned by zero.Init or whole
        rec["loaded_partitioned"].append(any(hasattr(p, "ds_id") for p in model.parameters()))
        return orig_digest(model)

    def refs(self, model, resumed):
        head = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        part = int(head.ds_tensor.numel()) if hasattr(head, "ds_id") else int(head.numel())
        rec["engine"].append(
            [
                type(model).__name__,
                self.accelerator.distributed_type.value,
                part,
                head.ds_numel if hasattr(head, "ds_id") else part,
            ]
        )
        return orig_refs(self, model, resumed)

    def batch(self, model, groups):
        b = orig_batch(self, model, groups)
        if model.training and self.state.global_step == 0 and b.ref_logps is not None:
            rec["step0"].append([b.sum[b.valid].tolist(), b.ref_logps[b.valid].tolist()])
        return b

    T.weights_digest, T.AFTTrainer._compute_references, T.AFTTrainer.candidate_batch = digest, refs, batch
    _runs(model, Path(cand_dir), out, 2, 2, config)
    rank, world = rank_and_world()
    for run in ("dpo", "lora", "sft"):
        state = json.loads(sorted((out / run / "checkpoints").glob("checkpoint-*/trainer_state.json"))[-1].read_text())
        rec["logs"][run] = state["log_history"]
    rec["world"] = world

    # AFTTrainer from Python, TRL's unpaired-preference rows, the same DeepSpeed config
    from aftune import AFTConfig, AFTTrainer

    rows = [
        {"prompt": g["prompt"], "completion": c["text"], "label": c["correct"]}
        for g in map(json.loads, (Path(cand_dir) / "cands.jsonl").read_text().splitlines())
        for c in g["candidates"]
    ]
    args = AFTConfig(
        output_dir=str(out / "py"),
        method="dpo",
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=0.5,
        optim="sgd",
        max_grad_norm=0.0,
        max_candidates=4,
        max_response_tokens=160,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        deepspeed=config,
    )
    trainer = AFTTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(str(out / "py" / "model"))
    rec["py_distributed_type"] = trainer.accelerator.distributed_type.value
    barrier()

    # divergence on one rank only: both must stop, each with the message
    orig_terms = T.AFTTrainer.alignment_terms

    def nan_on_rank1(self, model, groups):
        per_q, stats = orig_terms(self, model, groups)
        if rank == 1 and self.state.global_step == 1:
            per_q = per_q * torch.tensor(float("nan"))
        return per_q, stats

    T.AFTTrainer.alignment_terms = nan_on_rank1
    from aftune.commands.align import run_align

    t0 = time.time()
    try:
        run_align(
            _align_cfg(
                model,
                str(Path(cand_dir) / "cands.jsonl"),
                str(out / "nan"),
                2,
                1,
                method="bc",
                max_steps=3,
                deepspeed=config,
            )
        )
        rec["nan"] = None
    except T.TrainingDiverged as e:
        rec["nan"] = str(e)
    rec["nan_seconds"] = time.time() - t0
    Path(out, f"rank{rank}.json").write_text(json.dumps(rec))


def _torchrun(*argv: str) -> subprocess.Popen:
    """torchrun of ARGV as 2 CPU processes (DeepSpeed's CPU accelerator); output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            *argv,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert proc.returncode == 0, out[-6000:]
    return out


def _losses(log_history: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log_history if "loss" in e}


def _untied(weights: dict) -> dict:
    """DeepSpeed's gathered state dict also names the LM head the tiny Llama ties to its embedding (save_pretrained
    leaves it out): the same tensor, dropped here."""
    import torch

    weights = dict(weights)
    if "lm_head.weight" in weights and "model.embed_tokens.weight" in weights:
        if torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"]):
            del weights["lm_head.weight"]
    return weights


def _assert_same_weights(a: dict, b: dict, init: dict | None = None) -> None:
    import torch

    a, b = _untied(a), _untied(b)
    assert a.keys() == b.keys()
    if init is not None:
        assert max((b[k] - init[k]).abs().max().item() for k in b) > 1e-3  # the steps did something
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_equal_one_process(stage, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from aftune.commands.align import run_align  # noqa: F401  (imported before the launch: fail fast)

    torch.set_num_threads(1)
    model, cand = _make_inputs(tmp_path)
    c2, c1 = _copy_candidates(cand, tmp_path / "c2"), _copy_candidates(cand, tmp_path / "c1")
    zero = _torchrun(__file__, "--worker", str(CONFIGS[stage]), str(model), str(c2.parent), str(tmp_path / "zero"))
    try:  # meanwhile the plain one-process runs: 8 questions (examples) per step, no accumulation
        _runs(str(model), c1.parent, tmp_path / "one", 8, 1, None)
    except BaseException:
        _kill_tree(zero)
        raise
    log = _finish(zero, timeout=300)
    r0, r1 = (json.loads((tmp_path / "zero" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2

    # the engine that trained and scored the reference: DeepSpeed's, the head partitioned under ZeRO-3, and
    # align loaded its model already partitioned (no whole copy per process)
    for rec in (r0, r1):
        assert {tuple(e[:2]) for e in rec["engine"]} == {("DeepSpeedEngine", "DEEPSPEED")}
        for _, _, part, full in rec["engine"]:
            assert part < full if stage == 3 else part == full
        assert rec["loaded_partitioned"] == [stage == 3] * len(rec["loaded_partitioned"])
        assert rec["py_distributed_type"] == "DEEPSPEED"

    init = _load(model)
    for run in ("dpo", "sft"):  # per-step losses and final weights equal one process's
        one = json.loads((tmp_path / "one" / run / "metrics.json").read_text())
        zero_m = json.loads((tmp_path / "zero" / run / "metrics.json").read_text())
        lz, l1 = _losses(zero_m["log_history"]), _losses(one["log_history"])
        assert lz.keys() == l1.keys() and len(l1) >= 2, run
        for step in l1:
            assert lz[step] == pytest.approx(l1[step], rel=RTOL), (run, step)
        _assert_same_weights(_load(tmp_path / "zero" / run / "model"), _load(tmp_path / "one" / run / "model"), init)
        # compute counters summed over processes: the same tokens as one process scored
        for key in ("nll_tokens_scored", "candidate_tokens_scored", "optimizer_steps"):
            assert zero_m["compute"][key] == one["compute"][key], (run, key)
    # LoRA: the adapter and the merged model (its weights differ from the base in the adapted projections)
    assert (tmp_path / "zero" / "lora" / "adapter" / "adapter_model.safetensors").exists()
    _assert_same_weights(_load(tmp_path / "zero" / "lora" / "model"), _load(tmp_path / "one" / "lora" / "model"), init)
    # the saved models load as plain models
    for run in ("dpo", "lora", "sft", "py"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "zero" / run / "model"))
    assert max((_load(tmp_path / "zero" / "py" / "model")[k] - init[k]).abs().max().item() for k in init) > 1e-3

    # the DPO reference is the policy's own score at step 0, on every rank (computed by the same engine, in
    # another batching: sums of ~100 log-probs agree to 1e-5 relative)
    for rec in (r0, r1):
        assert rec["step0"]
        pol = torch.tensor([x for s, _ in rec["step0"] for x in s], dtype=torch.float64)
        ref = torch.tensor([x for _, r in rec["step0"] for x in r], dtype=torch.float64)
        torch.testing.assert_close(pol, ref, rtol=1e-5, atol=1e-4)
    # logged metrics are averaged over both processes: the ranks log the same values
    for run in ("dpo", "lora", "sft"):
        keys = ("nll", "align_loss", "score_pos", "score_neg", "eval_nll", "loss")
        pick = lambda h: [{k: e[k] for k in keys if k in e} for e in h]  # noqa: E731
        assert pick(r0["logs"][run]) == pick(r1["logs"][run]), run
        assert any("nll" in e for e in r0["logs"][run]), run

    # NaN on rank 1 only: both ranks raise TrainingDiverged within seconds, not at the collective timeout
    assert "became nan" in r1["nan"] and "non-finite on another process" in r0["nan"], (r0["nan"], r1["nan"])
    assert r0["nan_seconds"] < 60 and r1["nan_seconds"] < 60
    assert "Traceback" not in log


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_kill_and_resume_ends_at_the_straight_run(stage, tmp_path):
    """SIGKILL to torchrun and both ranks just after a ZeRO checkpoint; the same command again resumes from it
    (DeepSpeed's partitioned optimiser state, the data position) and ends at the weights and per-step losses of
    one plain process trained straight through on the same global batch."""
    import torch

    from aftune.commands.align import run_align

    torch.set_num_threads(1)
    model, cand = _make_inputs(tmp_path)
    c2 = _copy_candidates(cand, tmp_path / "c2")
    args = [
        "-m", "aftune.cli", "align", "--model", str(model), "--candidates", str(c2), "--out", str(tmp_path / "crash"),
        "--method", "dpo", "--task", "arith", "--task-args", TASK_ARGS, "--n-train", "16", "--batch-size", "2",
        "--max-steps", "4", "--save-steps", "1", "--logging-steps", "1", "--lr", "0.5", "--lr-schedule", "constant",
        "--warmup-ratio", "0", "--optim", "sgd", "--max-grad-norm", "0", "--max-candidates", "4",
        "--max-response-tokens", "160", "--quiet", "--deepspeed", str(CONFIGS[stage]),
    ]  # fmt: skip
    crash = _torchrun(*args)
    marker = tmp_path / "crash" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    try:  # meanwhile the straight one-process run: 2 processes x 2 questions = 4 questions per step
        cfg = _align_cfg(str(model), str(_copy_candidates(cand, tmp_path / "c1")), str(tmp_path / "one"), 4, 1)
        cfg.max_steps = 4
        run_align(cfg)
        deadline = time.time() + 240
        while not marker.exists() and crash.poll() is None and time.time() < deadline:
            time.sleep(0.002)
    finally:
        _kill_tree(crash)
    out, _ = crash.communicate()
    assert marker.exists() and not (tmp_path / "crash" / "metrics.json").exists(), (
        "not killed mid-run:\n" + out[-3000:]
    )

    log = _finish(_torchrun(*args))
    assert "aftune: resuming from" in log
    assert 1 <= log.count("{'loss'") < 4  # only the steps after the checkpoint ran again
    one, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "crash"))
    assert resumed["steps"] == one["steps"] == 4
    lr, l1 = _losses(resumed["log_history"]), _losses(one["log_history"])
    assert l1.keys() == set(range(1, 5)) and set(lr) <= set(l1) and 4 in lr
    for step, value in lr.items():
        assert value == pytest.approx(l1[step], rel=RTOL), step
    _assert_same_weights(_load(tmp_path / "crash" / "model"), _load(tmp_path / "one" / "model"), _load(model))


def test_deepspeed_with_use_cpu_is_refused(tmp_path):
    """accelerate would drop the DeepSpeed config for use_cpu and train plain DDP: AFTConfig says so instead."""
    from aftune import AFTConfig
    from aftune.io import InputError

    with pytest.raises(InputError, match="silently train without DeepSpeed"):
        AFTConfig(output_dir=str(tmp_path), deepspeed=str(CONFIGS[2]), use_cpu=True)


def test_trainer_hooks_check():
    """The start-up check passes on this transformers and fails when training_step ignores the hook."""
    from transformers import Trainer

    from aftune.training.trainer import check_trainer_hooks

    check_trainer_hooks()
    orig = Trainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):  # an older Trainer: always divides
        return orig(self, model, inputs, num_items_in_batch)

    Trainer.training_step = training_step
    try:
        with pytest.raises(RuntimeError, match="loss_is_scaled_for_ga"):
            check_trainer_hooks()
    finally:
        Trainer.training_step = orig


def test_shipped_deepspeed_configs_agree_with_the_accelerate_ones():
    """configs/deepspeed/*.json (what --deepspeed takes, and these tests run) and the accelerate yamls ask for the
    same stage, and ZeRO-3 gathers the weights on save in both (OUT/model is one plain model)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for stage in (2, 3):
        ds = json.loads(CONFIGS[stage].read_text())
        acc = load_config_from_file(str(ROOT / f"configs/accelerate/deepspeed_zero{stage}.yaml"))
        assert ds["zero_optimization"]["stage"] == acc.deepspeed_config["zero_stage"] == stage
        # batch sizes, accumulation and clipping come from aftune's flags
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
        ):
            assert ds[key] == "auto", key
    z3 = json.loads(CONFIGS[3].read_text())["zero_optimization"]
    assert z3["stage3_gather_16bit_weights_on_model_save"] is True


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(*sys.argv[2:6])
