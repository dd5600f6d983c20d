"""One dataclass per step. Flag names == YAML keys == field names (a trailing `_` dropped, `_` -> `-`
on the command line). The resolved config is saved next to each step's outputs."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aftune.io import InputError, atomic_write_text
from aftune.sampling.arguments import BACKEND_HELP, KSamplingArguments, ResampleArguments, SamplingArguments
from aftune.training.arguments import AlignmentArguments
from aftune.yaml_io import YamlDoc, read_yaml_mapping


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


# One meaning on every command: compute in bfloat16. Training keeps fp32 master weights (an optimiser step in bf16
# loses small updates), so it runs under bf16 autocast; commands that only run the model load bf16 weights.
BF16_HELP = "compute in bfloat16 (training: bf16 autocast over fp32 weights; sample / eval / assess: bf16 weights)"


@dataclass
class Common:
    task: str = opt("arith", "task name or task file (.yaml), or several joined by commas (gsm8k,aqua,my.yaml)")
    task_args: str = opt("", "task options as key=value,key=value (e.g. arith: n_train=4000,max_steps=3)")
    data_dir: str | None = opt(None, "folder laid out like shared/data (default: $AFTUNE_DATA, else the hub)")
    seed: int = opt(0, "random seed")
    trust_remote_code: bool = opt(False, "allow model repos to run their own code (off unless you trust it)")
    chat_template: str = opt(
        "auto",
        "prompt format: auto (the tokenizer's chat template if it has one) | none "
        "(plain Question:/Answer: text) | a chat template file",
    )
    bf16: bool = opt(False, BF16_HELP)
    quiet: bool = opt(False, "no progress bars")

    @property
    def inference_dtype(self) -> str:
        """The weights' dtype where a command only runs the model (sample, eval, assess): --bf16 computes in bf16."""
        return "bfloat16" if self.bf16 else "float32"


@dataclass
class TrainCommon(Common):
    n_train: int | None = opt(None, "use the first N training examples (default: all)")
    batch_size: int = opt(32, "examples (sft) or questions (align) per optimiser step and device")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr: float = opt(1e-3, "peak learning rate")
    lr_schedule: str = opt("cosine", "cosine | linear | constant (annealing to 0 matters: see docs)")
    warmup_ratio: float = opt(0.05, "fraction of steps for warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    optim: str = opt(
        "adamw_torch_fused", "optimizer, by transformers' name (adamw_torch_fused, adamw_torch, sgd, ...)"
    )
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    max_steps: int = opt(1500, "optimiser steps")
    max_response_tokens: int = opt(256, "truncate responses to this many tokens")
    logging_steps: int = opt(25, "log every N steps")
    save_steps: int = opt(200, "checkpoint every N steps (resume picks up the last one)")
    report_to: str = opt("none", "logging integrations: none | tensorboard | wandb | ... (comma separated)")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: int = opt(16, "LoRA alpha")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj", "LoRA target modules")
    merge_lora: bool = opt(False, "also save the LoRA-merged model")
    resume: bool = opt(True, "resume from the last checkpoint in --out if there is one")
    deepspeed: str | None = opt(
        None,
        "DeepSpeed JSON config (e.g. configs/deepspeed/zero3.json); launch with torchrun (docs/scaling.md)",
    )


@dataclass
class SFTConfig(TrainCommon):
    model: str = opt("tiny", "local path or hub id; 'tiny' builds the from-scratch demo model")
    out: str = opt("runs/sft", "output folder (model in OUT/model)")
    n_validation: int = opt(200, "held-out examples for eval loss / accuracy")
    eval_steps: int = opt(100, "evaluate every N steps; the best checkpoint by eval loss is kept")
    patience: int = opt(0, "stop after N evaluations without improvement (0 = run all steps)")
    eval_accuracy: bool = opt(True, "greedy accuracy on the validation slice at the end")
    vocab_size: int = opt(512, "tiny model: BPE vocabulary size")
    tiny_hidden: int = opt(256, "tiny model: hidden size")
    tiny_layers: int = opt(4, "tiny model: layers")
    tiny_heads: int = opt(4, "tiny model: attention heads")


@dataclass
class SampleConfig(Common, KSamplingArguments):
    """`aftune sample`: the sampling options come from KSamplingArguments (aftune.sampling.arguments)."""

    model: str = opt("runs/sft/model", "model to sample from")
    out: str = opt("runs/candidates.jsonl", "candidates JSONL (appended; a killed run resumes)")
    split: str = opt("train", "split to sample questions from")
    n_questions: int | None = opt(None, "first N questions of the split (default: all)")
    batch_size: int = opt(32, "questions per batch")
    shard: str = opt("", "i/n: sample only shard i of n (merge with `aftune merge`)")


@dataclass
class AlignConfig(TrainCommon, AlignmentArguments, ResampleArguments):
    """`aftune align`: the method's fields come from AlignmentArguments (shared with AFTConfig), the semi-online
    sampling options (--resample-*) from ResampleArguments (aftune.sampling.arguments)."""

    model: str = opt("runs/sft/model", "the VFT model to continue from")
    candidates: str = opt("runs/candidates.jsonl", "candidates file written by `aftune sample`")
    out: str = opt("runs/align", "output folder (model in OUT/model)")
    diag_every: int = opt(0, "log assessment diagnostics on held-out candidates every N steps (0 = off)")
    diag_questions: int = opt(64, "held-out questions (taken from the end of the candidates file) for diagnostics")
    diag_candidates: str | None = opt(None, "separate candidates file for diagnostics (then nothing is held out)")
    alarm_threshold: float = opt(0.05, "likelihood-displacement alarm: drop in mean score (nats/token)")
    lr: float = opt(3e-4, "peak learning rate")
    max_steps: int = opt(200, "optimiser steps")
    warmup_ratio: float = opt(0.0, "fraction of steps for warm-up")
    lr_schedule: str = opt("constant", "cosine | linear | constant")
    batch_size: int = opt(16, "questions per optimiser step")
    nll_per_question: int = opt(
        1,
        "references in the L_VFT term per question of a step (its batch is batch_size x this): match a VFT "
        "batch when training from the base model",
    )
    # semi-online AFT (aftune.training.online): re-sample the candidates from the current model mid-run
    resample_every: int = opt(
        0,
        "re-sample every question's candidates from the current model every S optimiser "
        "steps (0 = off: offline AFT; 1 = on-policy)",
    )
    resample_batch_size: int = opt(32, "semi-online: questions per sampling batch")

    def __post_init__(self) -> None:
        self.check_alignment(name=lambda f: "--" + flag_name_of(f).replace("_", "-"))


@dataclass
class EvalConfig(Common):
    model: str = opt("runs/align/model", "model to evaluate")
    split: str = opt("test", "split")
    n_questions: int | None = opt(None, "first N questions (default: all)")
    batch_size: int = opt(64, "questions per batched greedy pass")
    max_new_tokens: int = opt(256, "max tokens per answer")
    candidates: str | None = opt(None, "also report assessment accuracy on this candidates file")
    out: str = opt("runs/eval.json", "metrics JSON (per-question predictions next to it)")
    backend: str = opt("auto", BACKEND_HELP)


@dataclass
class AssessConfig(Common, KSamplingArguments):
    """`aftune assess`: the sampling options (used when no candidates are given) from KSamplingArguments."""

    model: str = opt("runs/sft/model", "model(s) to assess, comma separated (e.g. VFT,AFT)")
    names: str = opt("", "display names for the models, comma separated")
    candidates: str | None = opt(None, "candidates file; without one, sample --k per question first")
    split: str = opt("train", "split to sample from when no candidates are given")
    n_questions: int | None = opt(200, "questions to sample when no candidates are given")
    batch_size: int = opt(16, "questions per scoring (and sampling) batch")
    out: str = opt("runs/assess", "output folder (assessment.json, assessment.md, PNGs)")


@dataclass
class MergeConfig:
    out: str = opt("runs/candidates.jsonl", "merged candidates file; shards are OUT.shard{i}of{n}.jsonl")
    shards: int = opt(0, "n: merge OUT.shard0ofn.jsonl ... OUT.shard{n-1}ofn.jsonl")
    inputs: str = opt("", "or: comma-separated shard files to merge")


@dataclass
class DemoConfig:
    out: str = opt("runs/demo", "output folder")
    quick: bool = opt(False, "smoke test: tiny budget, a few minutes")
    methods: str = opt("", "extra `aftune align` methods for the table ('all' or a comma list; ~2 min each)")
    seed: int = opt(0, "random seed")
    bf16: bool = opt(False, BF16_HELP)
    quiet: bool = opt(False, "no progress bars")


def flag_name_of(name: str) -> str:
    return name.rstrip("_")


def flag_name(f: dataclasses.Field) -> str:
    return flag_name_of(f.name)


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """{field name: (base type, optional)} of a config dataclass: `int | None` -> (int, True). The one place
    that reads annotations (strings under `from __future__ import annotations`)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        optional = False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional, tp = len(args) < len(typing.get_args(tp)), args[0]
        out[name] = (tp, optional)
    return out


def load_yaml_config(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML config whose keys are flag names; unknown keys are an error naming file, line and key."""
    doc = read_yaml_mapping(path, "config file")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = {flag_name(f).replace("-", "_"): f.name for f in fields.values()}
    out = {}
    for key, value in doc.data.items():
        norm = str(key).replace("-", "_")
        if norm not in known:
            raise doc.error(str(key), f"unknown key (known: {', '.join(sorted(known))})")
        out[known[norm]] = typed_value(value, *field_types(cls)[known[norm]], doc, str(key))
    return out


def typed_value(value: Any, base: type, optional: bool, doc: YamlDoc, key: str, strict_str: bool = False) -> Any:
    """The YAML value as the field's type, or InputError at `key` (a dotted path into `doc`): a wrong type
    would otherwise surface as a traceback deep inside a step."""
    if value is None and optional:
        return None
    if base is bool and isinstance(value, bool):
        return value
    if not isinstance(value, bool):
        if base is int and isinstance(value, int):
            return value
        if base is float and isinstance(value, (int, float)):
            return float(value)
        if base is str and (isinstance(value, str) or not strict_str and isinstance(value, (int, float))):
            return str(value)  # `names: 7`, `task_args: 3` are strings the user meant
    want = f"{base.__name__} or null" if optional else base.__name__
    got = "null" if value is None else type(value).__name__
    raise doc.error(key, f"expected {want}, got {got}")


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    data = {flag_name(f): getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    path = Path(out_dir) / name
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def parse_task_args(spec: str) -> dict[str, Any]:
    """'n_train=4000,max_steps=3' -> {'n_train': 4000, 'max_steps': 3} (ints/floats/bools parsed)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise InputError(f"expected key=value, got '{part}'", field="--task-args")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v.strip())
        except yaml.YAMLError as e:
            raise InputError(
                f"not a valid value in '{part}' ({getattr(e, 'problem', None) or e})", field="--task-args"
            ) from None
    return out


@dataclass
class ExportConfig:
    candidates: str = opt("runs/candidates.jsonl", "candidates file(s) to export, comma separated")
    format: str = opt("unpaired", "unpaired (TRL KTOTrainer) | pairwise (TRL DPOTrainer) | grouped (aftune's records)")
    out: str = opt("runs/trl", "output folder: OUT/train.parquet, OUT/meta.json, OUT/README.md")
    max_pairs_per_question: int | None = opt(
        None, "pairwise: a seeded sample of at most N pairs per question (default: every (correct, wrong) pair)"
    )
    seed: int = opt(0, "random seed of the pair sample")
    include_reference: bool = opt(True, "the reference solution counts as one more correct completion")


@dataclass
class ImportConfig:
    dataset: str = opt(
        "",
        "TRL-style dataset: a .parquet / .jsonl file or a folder of them (unpaired: prompt, "
        "completion, label; or preference: prompt, chosen, rejected)",
    )
    out: str = opt("runs/imported.jsonl", "candidates file to write (and OUT.meta.json)")
    task: str | None = opt(None, "task name of the groups (`aftune align --task` must name it; default: custom)")


@dataclass
class IterateConfig(AlignConfig, KSamplingArguments):
    """`aftune iterate`: every `aftune align` field (the method and its training), plus the rounds' sampling
    (KSamplingArguments; max_new_tokens also bounds each greedy eval answer, and backend runs both) and
    evaluation. Each round samples from, and aligns, the previous round's model."""

    model: str = opt("runs/sft/model", "the start model M_0 (round 1 samples from it and continues it)")
    candidates: str = opt("", "round 1's candidates file (sampled from --model) instead of sampling it ('' = sample)")
    out: str = opt("runs/iterate", "output folder: OUT/round{r}/, OUT/metrics.json, OUT/report.md")
    rounds: int = opt(3, "rounds of sample -> align -> eval")
    fresh_questions: bool = opt(False, "each round samples a disjoint slice of the train split (needs --n-questions)")
    n_questions: int | None = opt(None, "train questions sampled per round (default: all)")
    sample_batch_size: int = opt(32, "questions per sampling batch")
    eval_split: str = opt("test", "split for each round's greedy accuracy")
    eval_questions: int | None = opt(None, "first N questions of --eval-split (default: all)")
    eval_batch_size: int = opt(64, "questions per batched greedy pass")


@dataclass
class GRPORunConfig(TrainCommon, SamplingArguments):
    """`aftune grpo`: GRPO through trl.GRPOTrainer, rewarded by the task's own grader. The sampling options come
    from SamplingArguments (max_new_tokens is also TRL's max_completion_length and dr_grpo's constant; backend is
    the engine of aftune's rollouts)."""

    model: str = opt(
        "runs/sft/model",
        "the model to train (a saved model folder: with --beta > 0 TRL reloads the reference from it)",
    )
    out: str = opt("runs/grpo", "output folder (model in OUT/model, metrics in OUT/metrics.json)")
    n_questions: int | None = opt(None, "first N train questions as prompts (default: all)")
    num_generations: int = opt(8, "completions per prompt (GRPO's group size G)")
    rollout: str = opt(
        "auto",
        "who generates: trl (TRL's generate) | aftune (aftune's sampler through TRL's rollout_func: stop strings, "
        "the task's calculator) | auto (aftune where the task uses a calculator, else trl)",
    )
    loss_type: str = opt("dr_grpo", "grpo | dr_grpo | dapo (TRL's loss_type)")
    beta: float = opt(0.0, "KL coefficient to the start model (0 = no reference model)")
    epsilon: float = opt(0.2, "PPO-style clipping range")
    num_iterations: int = opt(1, "optimisation passes per generation batch (TRL's mu)")
    scale_rewards: str = opt("group", "group | batch | none (Dr. GRPO: none)")
    lr: float = opt(1e-5, "peak learning rate")
    max_steps: int = opt(100, "optimiser steps")
    batch_size: int = opt(4, "prompts per optimiser step and device (each with --num-generations completions)")
    eval_split: str = opt("test", "split for the greedy accuracy after training")
    eval_questions: int | None = opt(None, "first N questions of --eval-split (default: all)")
    eval_batch_size: int = opt(64, "questions per batched greedy pass")
