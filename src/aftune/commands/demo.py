"""`aftune demo`: the whole method on the built-in `arith` task, on a CPU, with a report.

VFT of the shipped pretrained base (`arith-base`) on a small labelled set (annealed to 0) -> sample k
candidates per training question -> continue training with
  * control: the same NLL batches, no alignment term (so any AFT gain is not just "more training")
  * AFT-BC: the same NLL batches + lambda * boundary-constrained alignment loss
  * RFT: NLL over references + distinct correct samples
-> greedy test accuracy and assessment diagnostics on held-out candidates -> runs/demo/report.md.
Each step writes its own folder and is skipped when its output already exists, so a killed demo
resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from aftune.commands.align import run_align
from aftune.commands.assess import assess_models
from aftune.commands.common import load_for_inference
from aftune.commands.eval import run_eval
from aftune.commands.resumable import Steps, run_and_mark
from aftune.commands.sample import run_sample
from aftune.commands.sft import run_sft
from aftune.config import AlignConfig, DemoConfig, EvalConfig, SampleConfig, SFTConfig, save_config
from aftune.evaluation.run_report import write_run_report
from aftune.io import InputError
from aftune.records import read_groups
from aftune.training.methods import METHODS as ALL_METHODS


@dataclass(frozen=True)
class DemoPlan:
    n_train: int
    n_validation: int
    n_test: int
    n_sample: int  # training questions sampled for alignment
    n_assess: int  # held-out (validation) questions sampled for assessment diagnostics
    k: int
    temperature: float
    vft_steps: int
    vft_batch: int
    vft_lr: float
    align_steps: int
    align_batch: int
    align_lr: float
    beta: float
    hidden: int
    layers: int
    heads: int
    vocab: int
    max_new_tokens: int
    task_args: str  # arith difficulty knobs
    diag_every: int = 30  # held-out assessment diagnostics every N alignment steps
    # the model VFT starts from: a built-in or local pretrained base, or "tiny" (from scratch, the earlier
    # testbed; hidden / layers / heads / vocab then size it)
    base: str = "tiny"


# The data-limited testbed (docs/results.md, "The testbed"): the shipped pretrained base (1-2-step problems)
# fine-tuned on 1,000 labelled 3-4-step problems, one reference each; every value at most 200; arith's
# calculator makes the arithmetic exact, so errors are reasoning errors. FULL is the demo's cut of it, sized
# for 15 minutes on 2 AVX2 cores; the studies run it at full size (600 VFT steps, all 1,000 questions sampled
# 16 times, 100 alignment steps, 1,000 test questions: configs/experiments/main.yaml).
TESTBED_TASK = "min_steps=3,max_steps=4,max_number=20,max_value=200"
FULL = DemoPlan(
    n_train=1000,
    n_validation=200,
    n_test=300,
    n_sample=300,
    n_assess=80,
    k=8,
    temperature=0.8,
    vft_steps=400,
    vft_batch=16,
    vft_lr=2e-3,
    align_steps=60,
    align_batch=4,
    align_lr=1e-4,
    beta=0.5,
    hidden=192,
    layers=3,
    heads=4,
    vocab=512,
    max_new_tokens=128,
    task_args=TESTBED_TASK,
    diag_every=25,
    base="arith-base",
)
QUICK = DemoPlan(
    n_train=300,
    n_validation=40,
    n_test=60,
    n_sample=32,
    n_assess=16,
    k=4,
    temperature=0.8,
    vft_steps=40,
    vft_batch=8,
    vft_lr=2e-3,
    align_steps=10,
    align_batch=4,
    align_lr=2e-4,
    beta=0.5,
    hidden=64,
    layers=2,
    heads=2,
    vocab=300,
    max_new_tokens=96,
    task_args=TESTBED_TASK,
    diag_every=5,
    base="arith-base",
)
VFT_WARMUP = 0.03
METHODS = {"control": "vft", "AFT-BC": "bc", "RFT": "rft"}
# Seconds per step of one run of each plan (2 AMD EPYC AVX-512 cores): the runner's pace on the steps done
# scales these into the "time left" it prints, whatever the host. Steps not listed (extra --methods) count 0.
EXPECTED_SECONDS = {
    FULL: {
        "VFT": 68,
        "sample (train)": 21,
        "sample (assess)": 12,
        "control": 22,
        "AFT-BC": 40,
        "RFT": 11,
        "eval VFT": 11,
        "eval control": 11,
        "eval AFT-BC": 11,
        "eval RFT": 4,
    },
    QUICK: {
        "VFT": 6.3,
        "sample (train)": 1.1,
        "sample (assess)": 0.6,
        "control": 1.9,
        "AFT-BC": 3.8,
        "RFT": 1.9,
        "eval VFT": 0.6,
        "eval control": 0.6,
        "eval AFT-BC": 0.6,
        "eval RFT": 0.7,
    },
}


def task_args_for(plan: DemoPlan, seed: int) -> str:
    """The arith task's options for a plan: split sizes and difficulty, data drawn with `seed`."""
    return f"seed={seed},n_train={plan.n_train},n_validation={plan.n_validation},n_test={plan.n_test},{plan.task_args}"


def run_demo(cfg: DemoConfig, plan: DemoPlan | None = None) -> dict:
    plan = plan or (QUICK if cfg.quick else FULL)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    common = dict(task="arith", task_args=task_args_for(plan, cfg.seed), seed=cfg.seed, quiet=cfg.quiet, bf16=cfg.bf16)
    step = Steps(out, "demo", expected=EXPECTED_SECONDS.get(plan))
    timings = step.timings

    vft = out / "vft"
    step("VFT", vft / "metrics.json", run_sft, vft_config(plan, common, vft))
    vft_model = str(vft / "model")

    sample_common = dict(
        **common,
        model=vft_model,
        k=plan.k,
        temperature=plan.temperature,
        max_new_tokens=plan.max_new_tokens,
        batch_size=32,
    )
    cands, assess = out / "candidates.jsonl", out / "assess_candidates.jsonl"
    step(
        "sample (train)",
        cands.with_suffix(".done"),
        run_and_mark,
        run_sample,
        SampleConfig(**sample_common, out=str(cands), split="train", n_questions=plan.n_sample),
    )
    step(
        "sample (assess)",
        assess.with_suffix(".done"),
        run_and_mark,
        run_sample,
        SampleConfig(**sample_common, out=str(assess), split="validation", n_questions=plan.n_assess),
    )

    models = {"VFT": vft_model}
    runs = dict(METHODS)
    runs.update({m: m for m in extra_methods(cfg.methods) if m not in runs.values()})
    for name, method in runs.items():
        d = out / name
        step(name, d / "metrics.json", run_align, align_config(plan, common, vft_model, cands, assess, d, method))
        models[name] = str(d / "model")

    for name, path in models.items():
        step(
            f"eval {name}",
            out / "eval" / f"{name}.json",
            run_eval,
            EvalConfig(
                **common,
                model=path,
                split="test",
                batch_size=64,
                max_new_tokens=plan.max_new_tokens,
                out=str(out / "eval" / f"{name}.json"),
            ),
        )

    assessed = (
        json.loads((out / "assess" / "assessment.json").read_text())["models"]
        if (out / "assess" / "assessment.json").exists()
        else {}
    )
    if set(models) - set(assessed):
        t0 = time.time()
        _assess(models, assess, out / "assess")
        step.record("assess", time.time() - t0)

    report = write_run_report(out, models, plan=plan, timings=timings)
    print(f"[demo] report: {report}")
    return {"report": str(report), "timings": timings}


PROTOCOLS = {
    "continue": "continue from the VFT model for align_steps more steps (the paper's pipeline)",
    "from_base": "train from the base model for VFT's budget (its steps, learning rate and NLL batch), as RFT "
    "and ReST-EM train",
}


def base_model(plan: DemoPlan, vft_dir: Path) -> str:
    """The model VFT started from: the plan's base, or (from scratch) the VFT run's saved initialisation."""
    return str(vft_dir / "init") if plan.base == "tiny" else plan.base


def vft_config(plan: DemoPlan, common: dict, out: Path) -> SFTConfig:
    """VFT from the plan's base model, cosine-annealed to 0 so alignment starts from a converged model."""
    return SFTConfig(
        **common,
        model=plan.base,
        out=str(out),
        max_steps=plan.vft_steps,
        batch_size=plan.vft_batch,
        lr=plan.vft_lr,
        lr_schedule="cosine",
        warmup_ratio=VFT_WARMUP,
        eval_steps=max(plan.vft_steps // 8, 5),
        save_steps=max(plan.vft_steps // 8, 5),
        n_validation=plan.n_validation,
        eval_accuracy=False,
        tiny_hidden=plan.hidden,
        tiny_layers=plan.layers,
        tiny_heads=plan.heads,
        vocab_size=plan.vocab,
        logging_steps=max(plan.vft_steps // 20, 1),
    )


def align_config(
    plan: DemoPlan,
    common: dict,
    vft_model: str,
    cands: Path,
    assess: Path,
    out: Path,
    method: str,
    protocol: str = "continue",
) -> AlignConfig:
    """One alignment run under a protocol (PROTOCOLS): every method gets the same steps, batches and diagnostics.

    continue: from the VFT model, align_steps at align_lr, re-warmed gently and annealed again.
    from_base: from the base model with VFT's steps, peak lr and warm-up, and VFT's NLL batch (vft_batch
    references per step over align_batch questions), so the control (`vft`) is VFT run again."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol '{protocol}'; choose from: {', '.join(PROTOCOLS)}", field="protocol")
    if protocol == "continue":
        run = dict(model=vft_model, max_steps=plan.align_steps, lr=plan.align_lr, warmup_ratio=0.1)
    else:
        if plan.vft_batch % plan.align_batch:
            raise InputError(
                f"from_base needs vft_batch ({plan.vft_batch}) to be a multiple of align_batch ({plan.align_batch})",
                field="plan.align_batch",
            )
        run = dict(
            model=base_model(plan, Path(vft_model).parent),
            max_steps=plan.vft_steps,
            lr=plan.vft_lr,
            warmup_ratio=VFT_WARMUP,
            nll_per_question=plan.vft_batch // plan.align_batch,
        )
    return AlignConfig(
        **common,
        **run,
        candidates=str(cands),
        out=str(out),
        method=method,
        beta=plan.beta,
        batch_size=plan.align_batch,
        lr_schedule="cosine",
        n_train=plan.n_train,
        diag_every=plan.diag_every,
        diag_candidates=str(assess),
        diag_questions=plan.n_assess,
        logging_steps=max(run["max_steps"] // 10, 1),
        save_steps=run["max_steps"],
    )


def extra_methods(spec: str) -> list[str]:
    """--methods: 'all' or a comma list of `aftune align` methods to add to the demo's table."""
    names = list(ALL_METHODS) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    for m in names:
        if m not in ALL_METHODS:
            raise InputError(f"unknown method '{m}'; choose from: {', '.join(ALL_METHODS)}", field="--methods")
    return names


def _assess(models: dict[str, str], candidates: Path, out: Path) -> None:
    groups = read_groups(candidates)
    loaded = {n: load_for_inference(p) for n, p in models.items()}
    assess_models(loaded, groups, out)
