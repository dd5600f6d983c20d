"""`aftune sample`, `aftune eval` and `aftune assess`: thin step runners over the library."""

from __future__ import annotations

import json
import time
from pathlib import Path

from aftune.config import AssessConfig, EvalConfig, SampleConfig, parse_task_args, save_config
from aftune.io import InputError, atomic_write_json, write_jsonl
from aftune import modeling
from aftune.records import Group
from aftune.tasks import get_tasks


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """modeling.load_model_and_tokenizer, with "no such model" (a hub id that is not there or cannot be
    reached, a folder without a usable config.json) as one InputError line instead of a hub traceback."""
    try:
        return modeling.load_model_and_tokenizer(name_or_path, dtype, trust_remote_code)
    except InputError:
        raise
    except (OSError, ValueError) as e:  # transformers: OSError if absent, ValueError if not a model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load a model from here ({first})", name_or_path, field="--model") from None


def load_for_inference(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Model + tokenizer on this process's accelerator (sample, eval, assess; training lets Trainer place it)."""
    from aftune.distributed import local_device

    model, tok = load_model_and_tokenizer(name_or_path, dtype, trust_remote_code)
    return model.to(local_device()), tok


def tasks_for(cfg) -> list:
    """The config's tasks; the registry's ValueErrors (unknown task or option) become one-line InputErrors."""
    try:
        return get_tasks(cfg.task, parse_task_args(cfg.task_args), cfg.data_dir)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e), field="--task") from None


def load_examples(task, split: str) -> list:
    try:
        return task.load(split)
    except InputError:
        raise
    except ValueError as e:  # e.g. a split the task does not have
        raise InputError(f"task '{task.name}': {e}", field="--split") from None


def _single_task(cfg):
    tasks = tasks_for(cfg)
    if len(tasks) != 1:
        raise InputError("sample one task per candidates file (mix them at `aftune align --candidates a,b`)", field="--task")
    return tasks[0]


def _shard(spec: str) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"expected i/n, got '{spec}'", field="--shard") from None
    if not 0 <= i < n:
        raise InputError(f"shard index must be in [0, {n}), got {i}", field="--shard")
    return i, n


def shard_path(out: str, shard: tuple[int, int] | None) -> Path:
    p = Path(out)
    return p if shard is None else p.with_name(f"{p.stem}.shard{shard[0]}of{shard[1]}{p.suffix}")


def run_sample(cfg: SampleConfig) -> dict:
    from aftune.sampling.sampler import SamplingConfig
    from aftune.sampling.store import sample_candidates

    # Every check before any write, so a bad invocation leaves an existing candidates file as it was.
    if cfg.k < 2:
        raise InputError(f"k must be >= 2 to have anything to compare, got {cfg.k}", field="--k")
    for name in ("n_questions", "batch_size", "max_new_tokens"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise InputError(f"must be >= 1, got {value}", field="--" + name.replace("_", "-"))
    if cfg.backend not in ("hf", "vllm"):
        raise InputError(f"unknown backend '{cfg.backend}' (hf | vllm)", field="--backend")
    task = _single_task(cfg)
    examples = load_examples(task, cfg.split)
    if cfg.n_questions:
        examples = examples[:cfg.n_questions]
    if not examples:
        raise InputError(f"split '{cfg.split}' of task '{task.name}' is empty", field="--split")
    from aftune.distributed import env_shard

    shard = _shard(cfg.shard or env_shard())  # under `accelerate launch`, one shard per process
    if shard is not None:
        examples = examples[shard[0]::shard[1]]
    out = shard_path(cfg.out, shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    scfg = SamplingConfig(k=cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          seed=cfg.seed, batch_size=cfg.batch_size, stop=("\nQuestion:",))
    if cfg.backend == "vllm":
        from aftune.modeling import load_tokenizer
        from aftune.sampling.vllm_backend import generate_k_vllm

        tok = load_tokenizer(cfg.model, cfg.trust_remote_code)  # for the meta check; vLLM loads its own
        stats = sample_candidates(None, tok, task, examples, out, scfg, model_name=cfg.model, progress=not cfg.quiet,
                                  generate=lambda prompts, c: generate_k_vllm(cfg.model, prompts, c))
        save_config(cfg, out.parent, f"{out.stem}.config.yaml")
        return stats
    model, tok = load_for_inference(cfg.model, dtype="bfloat16" if cfg.bf16 else "float32",
                                          trust_remote_code=cfg.trust_remote_code)
    stats = sample_candidates(model, tok, task, examples, out, scfg, model_name=cfg.model, progress=not cfg.quiet)
    # Saved once the file is complete: a run refused by the meta check must not overwrite the config
    # that produced the existing candidates.
    save_config(cfg, out.parent, f"{out.stem}.config.yaml")
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (dict, list))}))
    return stats


def read_candidate_files(spec: str) -> list[Group]:
    from aftune.sampling.store import read_groups

    groups: list[Group] = []
    for path in [p.strip() for p in spec.split(",") if p.strip()]:
        groups += read_groups(path)
    return groups


def run_eval(cfg: EvalConfig) -> dict:
    from aftune.evaluation.accuracy import greedy_accuracy
    from aftune.training.run import load_split

    tasks = tasks_for(cfg)
    items = load_split(tasks, cfg.split, cfg.n_questions)
    model, tok = load_for_inference(cfg.model, trust_remote_code=cfg.trust_remote_code)
    t0 = time.time()
    res = greedy_accuracy(model, tok, items, cfg.max_new_tokens, cfg.batch_size, progress=not cfg.quiet)
    res["eval_seconds"] = round(time.time() - t0, 1)
    out = Path(cfg.out)
    write_jsonl(out.with_suffix(".predictions.jsonl"), res.pop("predictions"))
    if cfg.candidates:
        from aftune.evaluation.assessment import assessment_metrics
        from aftune.scoring import score_texts

        groups = read_candidate_files(cfg.candidates)
        scores, refs = score_texts(model, tok, groups, progress=not cfg.quiet)
        res["assessment"] = {k: v for k, v in assessment_metrics(groups, scores, refs).items() if k != "acc_vs_k"}
    res.update({"model": cfg.model, "task": cfg.task, "split": cfg.split})
    atomic_write_json(out, res)
    save_config(cfg, out.parent, f"{out.stem}.config.yaml")
    print(json.dumps({k: v for k, v in res.items() if k != "assessment"}, default=str))
    return res


def assess_models(models: dict[str, tuple], groups: list[Group], out_dir: Path, batch_size: int = 16,
                  progress: bool = False) -> dict[str, dict]:
    """Score the same candidates under each model and write assessment.{json,md} + plots to out_dir."""
    from aftune.evaluation.assessment import assessment_metrics
    from aftune.evaluation.report import assessment_report
    from aftune.scoring import score_texts

    named_metrics, named_scores = {}, {}
    for name, (model, tok) in models.items():
        scores, refs = score_texts(model, tok, groups, batch_size, progress)
        named_metrics[name] = assessment_metrics(groups, scores, refs)
        pos = [s for g, ss in zip(groups, scores) for c, s in zip(g.candidates, ss) if c.correct]
        neg = [s for g, ss in zip(groups, scores) for c, s in zip(g.candidates, ss) if not c.correct]
        named_scores[name] = (pos, neg)
    assessment_report(out_dir, named_metrics, named_scores)
    return named_metrics


def run_assess(cfg: AssessConfig) -> dict:
    paths = [m.strip() for m in cfg.model.split(",") if m.strip()]
    names = [n.strip() for n in cfg.names.split(",") if n.strip()] or [Path(p).parent.name or p for p in paths]
    if len(names) != len(paths):
        raise InputError(f"{len(names)} names for {len(paths)} models", field="--names")
    out = Path(cfg.out)
    models = {n: load_for_inference(p, trust_remote_code=cfg.trust_remote_code) for n, p in zip(names, paths)}
    out.mkdir(parents=True, exist_ok=True)  # after the models load: a bad path leaves OUT untouched
    save_config(cfg, out)
    if cfg.candidates:
        groups = read_candidate_files(cfg.candidates)
    else:
        from aftune.sampling.sampler import SamplingConfig
        from aftune.sampling.store import read_groups, sample_candidates

        task = _single_task(cfg)
        examples = load_examples(task, cfg.split)[:cfg.n_questions]
        model, tok = models[names[0]]
        path = out / "candidates.jsonl"
        sample_candidates(model, tok, task, examples, path, SamplingConfig(
            k=cfg.k, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
            batch_size=cfg.batch_size, stop=("\nQuestion:",)), model_name=paths[0], progress=not cfg.quiet)
        groups = read_groups(path)
    metrics = assess_models(models, groups, out, cfg.batch_size, progress=not cfg.quiet)
    for n, m in metrics.items():
        print(n, json.dumps({k: v for k, v in m.items() if not isinstance(v, (dict, list))}, default=str))
    return metrics
