"""`aftune iterate`: rounds of sample -> label -> align -> eval, each round starting from the last one's model.

Round r (1..N) samples k candidates per question from M_{r-1} (M_0 = --model), labels them with the task's
grader, aligns M_{r-1} on them with any `aftune align` method into M_r, and measures M_r's greedy accuracy.
With --method dpo (its NLL term included) this is Iterative RPO (Pang et al., 2024): the DPO reference of
round r is M_{r-1}, the model the round starts from. Questions are the same every round, or with
--fresh-questions a disjoint slice of the train split per round.

OUT/round0/eval.json      the start model's accuracy
OUT/round{r}/             candidates.jsonl (+ sidecar), model/, metrics.json (align), eval.json
OUT/metrics.json          accuracy and compute per round (and cumulative)
OUT/report.md, OUT/accuracy.png

Each stage is a `resumable.Steps` step, and each resumes inside itself (sampling appends, align restarts
from its newest checkpoint), so a killed run, rerun with the same flags, ends where a straight run ends.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from aftune.commands.align import run_align
from aftune.commands.common import check_positive
from aftune.commands.eval import run_eval
from aftune.commands.resumable import Steps, run_and_mark
from aftune.commands.sample import run_sample
from aftune.config import AlignConfig, EvalConfig, IterateConfig, SampleConfig, save_config
from aftune.evaluation.plots import pyplot, save_figure
from aftune.evaluation.report import markdown_image, markdown_table, write_report
from aftune.io import InputError, atomic_write_json
from aftune.records import CandidatesMeta, meta_path_for
from aftune.sampling.shards import shard_file
from aftune.training.compute import sum_compute


def _common(cfg: IterateConfig) -> dict[str, Any]:
    return dict(
        task=cfg.task,
        task_args=cfg.task_args,
        data_dir=cfg.data_dir,
        trust_remote_code=cfg.trust_remote_code,
        chat_template=cfg.chat_template,
        bf16=cfg.bf16,
        quiet=cfg.quiet,
    )


def check_iterate(cfg: IterateConfig) -> None:
    if cfg.rounds < 1:
        raise InputError(f"must be >= 1, got {cfg.rounds}", field="--rounds")
    if cfg.k < 2:
        raise InputError(f"must be >= 2 to have anything to compare, got {cfg.k}", field="--k")
    if cfg.fresh_questions and not cfg.n_questions:
        raise InputError("--fresh-questions needs --n-questions (questions per round)", field="--n-questions")
    check_positive(cfg, ("n_questions", "eval_questions"))


def sample_config(cfg: IterateConfig, r: int, model: str, out: Path) -> tuple[SampleConfig, Path]:
    """Round r's `aftune sample` run and the candidates file it writes. Fresh questions: shard r-1 of
    `rounds` of the first rounds x n_questions train questions (questions i with i mod rounds == r-1)."""
    fresh = cfg.fresh_questions
    scfg = SampleConfig(
        **_common(cfg),
        seed=cfg.seed + r,
        model=model,
        out=str(out),
        split="train",
        n_questions=cfg.n_questions * cfg.rounds if fresh else cfg.n_questions,
        k=cfg.k,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.sample_batch_size,
        shard=f"{r - 1}/{cfg.rounds}" if fresh else "",
        backend=cfg.backend,
    )
    return scfg, (shard_file(out, r - 1, cfg.rounds) if fresh else out)


def align_config(cfg: IterateConfig, model: str, candidates: Path, out: Path) -> AlignConfig:
    """The round's `aftune align`: every AlignConfig field as given to iterate, from the round's model."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(AlignConfig)}
    values.update(model=model, candidates=str(candidates), out=str(out))
    return AlignConfig(**values)


def eval_config(cfg: IterateConfig, model: str, out: Path) -> EvalConfig:
    return EvalConfig(
        **_common(cfg),
        seed=cfg.seed,
        model=model,
        split=cfg.eval_split,
        n_questions=cfg.eval_questions,
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.max_new_tokens,
        out=str(out),
        backend=cfg.backend,
    )


def run_iterate(cfg: IterateConfig) -> dict:
    check_iterate(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    step = Steps(out, "iterate")
    base = out / "round0" / "eval.json"
    step("round0 eval", base, run_eval, eval_config(cfg, cfg.model, base))
    model = cfg.model
    for r in range(1, cfg.rounds + 1):
        d = out / f"round{r}"
        if r == 1 and cfg.candidates:
            cands = Path(cfg.candidates)  # round 1 on an existing candidates file (sampled from --model)
        else:
            scfg, cands = sample_config(cfg, r, model, d / "candidates.jsonl")
            step(f"round{r} sample", d / "candidates.done", run_and_mark, run_sample, scfg)
        step(f"round{r} align", d / "metrics.json", run_align, align_config(cfg, model, cands, d))
        model = str(d / "model")
        step(f"round{r} eval", d / "eval.json", run_eval, eval_config(cfg, model, d / "eval.json"))
    summary = summarize(cfg, out, step.timings)
    atomic_write_json(out / "metrics.json", summary)
    report = write_iterate_report(out, summary)
    print(f"[iterate] report: {report}")
    return summary


def _candidates_of(cfg: IterateConfig, out: Path, r: int) -> Path:
    if r == 1 and cfg.candidates:
        return Path(cfg.candidates)
    return sample_config(cfg, r, "", out / f"round{r}" / "candidates.jsonl")[1]


def round_compute(cands: Path, align_metrics: dict, eval_metrics: dict, timings: dict[str, float], r: int) -> dict:
    """One round's compute: sampling (from the candidates sidecar), training (align's compute block), eval."""
    stats = CandidatesMeta.read(meta_path_for(cands)).stats if meta_path_for(cands).exists() else {}
    stats = stats or {}
    train = dict(align_metrics.get("compute") or {})
    sample_tokens = int(stats.get("generated_tokens", 0))
    return {
        "sample_generated_tokens": sample_tokens,
        # all tokens sampled this round: the sampling pass plus any semi-online resampling inside align
        "generated_tokens": sample_tokens + int(train.get("generated_tokens", 0)),
        "tokens_scored": int(train.get("tokens_scored", 0)),
        "optimizer_steps": int(train.get("optimizer_steps", align_metrics.get("steps", 0))),
        "sample_seconds": timings.get(f"round{r} sample", 0.0),
        "align_seconds": timings.get(f"round{r} align", 0.0),
        "eval_seconds": timings.get(f"round{r} eval", 0.0),
        "train": train,
        "sample": {
            k: stats[k]
            for k in ("questions", "candidates", "frac_correct", "frac_mixed", "frac_any_correct", "wall_s")
            if k in stats
        },
    }


def summarize(cfg: IterateConfig, out: Path, timings: dict[str, float]) -> dict:
    """OUT/metrics.json: per round its accuracy, compute, and the cumulative compute up to it."""
    acc0 = json.loads((out / "round0" / "eval.json").read_text())["accuracy"]
    rounds: list[dict[str, Any]] = [
        {
            "round": 0,
            "model": cfg.model,
            "accuracy": acc0,
            "compute": {},
            "cumulative": {"generated_tokens": 0, "tokens_scored": 0, "optimizer_steps": 0, "wall_seconds": 0.0},
        }
    ]
    for r in range(1, cfg.rounds + 1):
        d = out / f"round{r}"
        align_m = json.loads((d / "metrics.json").read_text())
        eval_m = json.loads((d / "eval.json").read_text())
        comp = round_compute(_candidates_of(cfg, out, r), align_m, eval_m, timings, r)
        prev = rounds[-1]["cumulative"]
        wall = comp["sample_seconds"] + comp["align_seconds"]
        rounds.append(
            {
                "round": r,
                "model": str(d / "model"),
                "accuracy": eval_m["accuracy"],
                "compute": comp,
                "cumulative": {
                    "generated_tokens": prev["generated_tokens"] + comp["generated_tokens"],
                    "tokens_scored": prev["tokens_scored"] + comp["tokens_scored"],
                    "optimizer_steps": prev["optimizer_steps"] + comp["optimizer_steps"],
                    "wall_seconds": round(prev["wall_seconds"] + wall, 1),
                },
            }
        )
    total = sum_compute([{k: v for k, v in r_["compute"].items() if not isinstance(v, dict)} for r_ in rounds[1:]])
    return {
        "method": cfg.method,
        "rounds": rounds,
        "final_accuracy": rounds[-1]["accuracy"],
        "total": total,
        "fresh_questions": cfg.fresh_questions,
        "resample_every": cfg.resample_every,
    }


def plot_rounds(path: Path, rounds: list[dict]) -> Path:
    """Accuracy per round, and against cumulative generated tokens (the compute axis of the study)."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    acc = [100 * r["accuracy"] for r in rounds]
    a.plot([r["round"] for r in rounds], acc, marker="o")
    a.set_xlabel("round")
    a.set_ylabel("greedy test accuracy (%)")
    a.set_xticks([r["round"] for r in rounds])
    b.plot([r["cumulative"]["generated_tokens"] for r in rounds], acc, marker="o")
    b.set_xlabel("cumulative generated tokens")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_iterate_report(out: Path, summary: dict) -> Path:
    rows = []
    for r in summary["rounds"]:
        c, cum = r["compute"], r["cumulative"]
        rows.append(
            {
                "round": r["round"],
                "accuracy": r["accuracy"],
                "generated tokens": c.get("generated_tokens"),
                "tokens scored": c.get("tokens_scored"),
                "steps": c.get("optimizer_steps"),
                "sample s": c.get("sample_seconds"),
                "align s": c.get("align_seconds"),
                "cum. generated": cum["generated_tokens"],
                "cum. scored": cum["tokens_scored"],
                "cum. wall s": cum["wall_seconds"],
            }
        )
    cols = list(rows[0])
    table = markdown_table(rows, cols, {"accuracy": ".1%", "sample s": ".1f", "align s": ".1f", "cum. wall s": ".1f"})
    png = plot_rounds(out / "accuracy.png", summary["rounds"])
    how = (
        f"method `{summary['method']}`, {len(summary['rounds']) - 1} rounds, "
        f"{'fresh questions per round' if summary['fresh_questions'] else 'the same questions every round'}"
        + (f", semi-online resampling every {summary['resample_every']} steps" if summary["resample_every"] else "")
    )
    notes = (
        "Round 0 is the start model. Generated tokens: every sampled token of the round (the sampling pass "
        "plus any semi-online resampling). Tokens scored: training forward tokens (NLL + candidates). Wall "
        "seconds are those of the process that completed each stage (work lost to a kill is not counted). "
        "See docs/online.md."
    )
    return write_report(
        out / "report.md",
        "aftune iterate",
        [
            ("Setup", how),
            ("Accuracy and compute per round", table),
            ("Accuracy per round", markdown_image(png, "accuracy per round", out)),
            ("Notes", notes),
        ],
    )
