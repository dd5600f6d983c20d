"""`aftune grpo`: GRPO (Shao et al., 2024) through `trl.GRPOTrainer`, rewarded by the task's own grader.

For a prompt q, G completions o_1..o_G ~ pi_old(. | q) get rewards R_i = 1 if task.grade(o_i, q).correct else 0,
and group-relative advantages A_i = (R_i - mean_j R_j) / s, with s = std_j R_j (scale_rewards=group), the
batch's std (batch) or 1 (none). TRL maximises the clipped surrogate per token t of o_i,

    min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps, 1 + eps) A_i) - beta KL(pi_theta || pi_ref),
    rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t}),

averaged per sequence then over sequences (loss_type=grpo), summed and divided by G x max_completion_length
(dr_grpo), or averaged over all active tokens of the batch (dapo). The prompts are `task.prompt(example)` in
the run's prompt format, exactly as `aftune sample` and `aftune eval` give them, and the trained model is
saved as a plain OUT/model and evaluated by `aftune eval` (greedy accuracy) like every other run.

Compute: `generated_tokens` counts every completion token TRL generated (completion_ids, EOS included), from
the reward function, which TRL calls once per generated batch; it is kept in checkpoints (ComputeCounter), so a
resumed run counts like a straight one. `trl_num_input_tokens_seen` is TRL's own prompt + completion count
(state.num_input_tokens_seen), and `tokens_scored` = that x the forward passes per batch (grpo_forward_passes).
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

from transformers import set_seed

from aftune.commands.common import check_positive, load_model_checked, load_split, tasks_for
from aftune.commands.eval import run_eval
from aftune.commands.training import (
    check_train_args,
    peft_config,
    save_model,
    shared_resume_point,
    train_or_restore,
    trainer_kwargs,
)
from aftune.config import EvalConfig, GRPORunConfig, save_config
from aftune.io import InputError, atomic_write_json
from aftune.prompting import resolve_prompt_format, stop_strings
from aftune.records import Example
from aftune.sampling.arguments import BACKENDS, sampling_config
from aftune.sampling.engines import resolve_training_backend
from aftune.sampling.sampler import cut_at_stop
from aftune.tasks import Task
from aftune.training.compute import ComputeCounter, find_counter, training_compute
from aftune.training.replica import SamplingReplica

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ROLLOUTS = ("auto", "trl", "aftune")
SCALE_REWARDS = ("group", "batch", "none")


class TaskReward:
    """TRL reward function: 1.0 for a completion the task grades correct, else 0.0.

    TRL calls it as f(prompts=..., completions=..., completion_ids=..., example_id=[...], trainer_state=..., ...):
    every dataset column is passed by name, so `example_id` names each completion's question. Completions
    are cut at the task's stop strings first. `trainer` (set after the trainer is built) receives the count of
    generated tokens (sum of len(completion_ids)).
    """

    __name__ = "task_reward"  # TRL logs rewards under the callable's name

    def __init__(self, examples: dict[str, tuple[Task, Example]], stop: tuple[str, ...] = ()):
        self.examples, self.stop, self.trainer = examples, tuple(stop), None

    def __call__(
        self,
        prompts: list,
        completions: list,
        completion_ids: list | None = None,
        example_id: list | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if example_id is None:
            raise ValueError("task_reward needs the dataset's example_id column")
        rewards = []
        for completion, eid in zip(completions, example_id):
            task, ex = self.examples[eid]
            text = completion if isinstance(completion, str) else completion[-1]["content"]  # conversational rows
            rewards.append(1.0 if task.grade(cut_at_stop(text, self.stop)[0], ex).correct else 0.0)
        counter = find_counter(self.trainer) if self.trainer is not None else None
        if counter is not None and completion_ids is not None:
            counter.add("generated_tokens", sum(len(c) for c in completion_ids))
        return rewards


class SamplerRollout:
    """TRL `rollout_func`: the group's completions from aftune's sampler (generate_k) instead of TRL's generate.

    So GRPO samples exactly as `aftune sample` does for the other methods: the task's stop strings end a row,
    and a task with a calculator (`arith`) gets its `<<expr=` annotations filled in. TRL hands over its batch of
    prompts, each repeated once per completion in a row (its RepeatSampler); a run of identical prompts becomes
    one prompt with k = the run's length. Seeded by (seed, optimiser step, call within the step), so a resumed
    run draws the same completions as a straight one.

    engine: a vllm_backend.VLLMEngine (`--backend vllm`, CUDA only): the policy's current weights are loaded into
    it before each rollout; None: the built-in sampler on the live policy.
    """

    def __init__(self, tokenizer, cfg: GRPORunConfig, stop: tuple[str, ...], calculator: bool, engine=None):
        self.tok, self.cfg, self.stop, self.calculator, self.engine = tokenizer, cfg, tuple(stop), calculator, engine
        self.replica = SamplingReplica()  # whole weights when FSDP2 / ZeRO-3 shard the policy
        self._step, self._calls = -1, 0

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        from aftune.prompting import encode_prompt
        from aftune.sampling.sampler import generate_k, question_seed

        runs: list[list] = []  # [prompt, count] per run of identical consecutive prompts
        for p in prompts:
            if runs and runs[-1][0] == p:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
        counts = {c for _, c in runs}
        if len(counts) != 1:
            raise ValueError(f"rollout: expected every prompt repeated the same number of times, got {sorted(counts)}")
        k = counts.pop()
        if k == 1:  # prompts given once each: the group size is TRL's num_generations
            k = trainer.num_generations
        step = trainer.state.global_step
        self._calls = self._calls + 1 if step == self._step else 0
        self._step = step
        seed = zlib.crc32(f"{self.cfg.seed}:grpo:{step}:{self._calls}".encode())
        scfg = sampling_config(
            [],
            None,
            self.tok,
            self.cfg,
            k=k,
            stop=self.stop,
            calculator=self.calculator,
            seed=seed,
            batch_size=max(1, len(runs)),
        )
        model = self.replica(trainer.accelerator.unwrap_model(trainer.model))
        prompts = [p for p, _ in runs]
        seeds = [question_seed(seed, str(i)) for i in range(len(runs))]  # per group: both engines draw alike
        if self.engine is not None:
            self.engine.load_weights(model)
            samples = self.engine.generate(prompts, scfg, seeds)
        else:
            samples = generate_k(model, self.tok, prompts, scfg, seeds=seeds)
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for (p, _), group in zip(runs, samples):
            ids = encode_prompt(self.tok, p)
            for s in group:
                out["prompt_ids"].append(ids)
                out["completion_ids"].append(list(s.token_ids))
                out["logprobs"].append(list(s.token_logprobs))
        return out


def use_sampler(cfg: GRPORunConfig, tasks: list[Task]) -> bool:
    """--rollout auto: aftune's sampler where a task needs its calculator (TRL's generate has none) or where
    --backend vllm asks for vLLM (aftune's rollouts are the ones that can run there)."""
    return cfg.rollout == "aftune" or (
        cfg.rollout == "auto" and (any(t.calculator for t in tasks) or cfg.backend == "vllm")
    )


def rollout_engine(cfg: GRPORunConfig, tasks: list[Task]) -> str:
    """Who generates the rollouts: trl (TRL's own generate), or the engine of aftune's rollouts, hf (the built-in
    sampler on the live policy; what --backend auto gives) or vllm (CUDA only: refused where it cannot take
    the changing weights)."""
    if cfg.rollout == "trl" and cfg.backend == "vllm":
        raise InputError(
            "--backend picks the engine of aftune's rollouts, and --rollout trl generates with TRL; "
            "use --rollout aftune (or auto) with --backend vllm",
            field="--backend",
        )
    if not use_sampler(cfg, tasks):
        return "trl"
    return resolve_training_backend(cfg.backend, cfg.lora_r > 0, "--backend")


def check_grpo(cfg: GRPORunConfig) -> None:
    check_train_args(cfg)
    if cfg.loss_type not in LOSS_TYPES:
        raise InputError(f"expected one of {', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}", field="--loss-type")
    if cfg.scale_rewards not in SCALE_REWARDS:
        raise InputError(
            f"expected one of {', '.join(SCALE_REWARDS)}, got {cfg.scale_rewards!r}", field="--scale-rewards"
        )
    if cfg.rollout not in ROLLOUTS:
        raise InputError(f"expected one of {', '.join(ROLLOUTS)}, got {cfg.rollout!r}", field="--rollout")
    if cfg.backend not in BACKENDS:
        raise InputError(f"expected one of {', '.join(BACKENDS)}, got {cfg.backend!r}", field="--backend")
    if cfg.num_generations < 2:
        raise InputError(
            f"GRPO needs >= 2 completions per prompt, got {cfg.num_generations}", field="--num-generations"
        )
    check_positive(cfg, ("max_new_tokens", "num_iterations", "eval_batch_size"))
    if not cfg.beta >= 0:
        raise InputError(f"must be >= 0, got {cfg.beta}", field="--beta")
    if cfg.beta > 0 and not Path(cfg.model).is_dir():
        raise InputError(
            "with --beta > 0 TRL reloads the reference model from the policy's path; give a saved model folder",
            cfg.model,
            field="--model",
        )


def grpo_forward_passes(cfg: GRPORunConfig) -> int:
    """Forward passes TRL makes over each generated (prompt + completion) batch, with its default
    steps_per_generation = grad_accum: num_iterations with gradients, + 1 for the frozen reference when
    beta > 0, + 1 for the old policy's log-probs when num_iterations > 1 (trl/trainer/grpo_trainer.py,
    `_generate_and_score_completions`: old_per_token_logps is computed iff grad_accum % (steps_per_generation
    x num_iterations) != 0)."""
    return cfg.num_iterations + (cfg.beta > 0) + (cfg.num_iterations > 1)


def grpo_args(cfg: GRPORunConfig, out_dir: Path):
    """trl.GRPOConfig of a run. batch_size counts prompts: TRL's per_device_train_batch_size counts completions."""
    from trl import GRPOConfig  # optional dependency (the `grpo` extra): imported when GRPO runs

    return GRPOConfig(
        **trainer_kwargs(cfg, out_dir),
        per_device_train_batch_size=cfg.batch_size * cfg.num_generations,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        num_iterations=cfg.num_iterations,
        scale_rewards=cfg.scale_rewards,
        remove_unused_columns=False,
        log_completions=False,
    )


def run_grpo(cfg: GRPORunConfig) -> dict:
    """Train with GRPO, save OUT/model, evaluate it (OUT/eval.json); OUT/metrics.json has the run's compute."""
    from datasets import Dataset  # optional dependencies (the `grpo` extra): imported when GRPO runs
    from trl import GRPOTrainer

    check_grpo(cfg)
    out = Path(cfg.out)
    set_seed(cfg.seed)
    tasks = tasks_for(cfg)
    engine_name = rollout_engine(cfg, tasks)  # before the model loads: a refused --backend costs nothing
    train = load_split(tasks, "train", cfg.n_questions)
    model, tok = load_model_checked(cfg.model, trust_remote_code=cfg.trust_remote_code)
    fmt = resolve_prompt_format(cfg.chat_template, tok)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    examples = {f"{t.name}/{e.id}": (t, e) for t, e in train}
    ds = Dataset.from_list(
        [{"prompt": fmt.render(tok, t.prompt(e)), "example_id": f"{t.name}/{e.id}"} for t, e in train]
    )
    stop = tuple(dict.fromkeys(s for t in tasks for s in stop_strings(t, fmt, tok)))
    reward = TaskReward(examples, stop)
    rollout = None
    if engine_name != "trl":
        engine = None
        if engine_name == "vllm":
            from aftune.modeling import resolve_model
            from aftune.sampling.vllm_backend import get_engine

            # beside the policy on one GPU: the engine takes a third of its memory (as TRL colocates)
            dtype = "bfloat16" if cfg.bf16 else "float32"
            engine = get_engine(resolve_model(cfg.model), tok, dtype, gpu_memory_utilization=0.3)
        rollout = SamplerRollout(tok, cfg, stop, any(t.calculator for t in tasks), engine=engine)
    ckpt = out / "checkpoints"
    trainer = GRPOTrainer(
        rollout_func=rollout,
        model=model,
        reward_funcs=reward,
        args=grpo_args(cfg, ckpt),
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config(cfg),
        callbacks=[ComputeCounter()],
    )
    reward.trainer = trainer
    t0 = time.time()
    train_or_restore(trainer, shared_resume_point(cfg, ckpt))
    wall = time.time() - t0
    path = save_model(trainer, tok, out, cfg, cfg.model)
    compute = training_compute(trainer)
    seen = int(trainer.state.num_input_tokens_seen)
    compute["trl_num_input_tokens_seen"] = seen
    compute["tokens_scored"] = seen * grpo_forward_passes(cfg)
    metrics: dict[str, Any] = {
        "model": str(path),
        "method": f"grpo:{cfg.loss_type}",
        "train_seconds": round(wall, 1),
        "steps": trainer.state.global_step,
        "n_prompts": len(train),
        "rollout_engine": engine_name,  # trl | hf | vllm
        "compute": compute,
        "log_history": trainer.state.log_history,
    }
    if not trainer.is_world_process_zero():
        return metrics
    t0 = time.time()
    res = run_eval(
        EvalConfig(
            task=cfg.task,
            task_args=cfg.task_args,
            data_dir=cfg.data_dir,
            seed=cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
            chat_template=cfg.chat_template,
            bf16=cfg.bf16,
            quiet=cfg.quiet,
            model=str(path),
            split=cfg.eval_split,
            n_questions=cfg.eval_questions,
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
            out=str(out / "eval.json"),
        )
    )
    metrics.update(accuracy=res["accuracy"], eval_seconds=round(time.time() - t0, 1))
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
