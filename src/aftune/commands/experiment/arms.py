"""The arms study (`aftune experiment CONFIG.yaml` with `arms:`): per seed, the shared steps of every study
(VFT, one k-candidate sampling pass, assessment candidates, VFT eval; `experiment.shared`), then one
`aftune align`, `aftune iterate` or `aftune grpo` command per arm from that seed's VFT model, each evaluated on the
test split with per-question predictions, and a table of accuracy against compute (`experiment.arms_results`).

    name: online
    out: runs/experiments/testbed      # shared with the grid studies of the same plan (fingerprint-checked)
    report: runs/experiments/online
    base: full
    plan: {...}
    sample_k: 8
    data_seed: 0
    seeds: [0, 1, 2]
    arms:                              # arm name -> command + that command's config fields
      control: {command: align, method: vft}
      aft_bc_3_rounds: {command: iterate, method: bc, rounds: 3, fresh_questions: true}
      grpo_dr: {command: grpo, loss_type: dr_grpo, beta: 0.0}

Each arm starts from the study's defaults for its command (`arm_config`) and the arm's fields replace them.
OUT/seedS/online/<arm>/: arm.json (the arm as run), run/ (the command's --out), eval.json (+ predictions); the
layout and the Arm / ArmsStudy specs are `experiment.layout`'s, which the results (`experiment.arms_results`) read.
See docs/online.md, "The study".
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from aftune.commands.align import run_align
from aftune.commands.demo import align_config
from aftune.commands.eval import run_eval
from aftune.commands.experiment.arms_results import write_arms_results
from aftune.commands.experiment.config import check_scalars, num_list, parse_plan, parse_report
from aftune.commands.experiment.layout import (
    ARM_SPEC,
    CONTROL_ARM,
    EVAL,
    METRICS,
    Arm,
    ArmsStudy,
    arm_dir,
    arm_run_dir,
)
from aftune.commands.experiment.shared import (
    SeedFiles,
    check_fingerprint,
    check_seeds,
    fingerprint,
    keep_config,
    run_and_clean,
    seed_steps,
)
from aftune.commands.grpo import check_grpo, run_grpo
from aftune.commands.iterate import check_iterate, run_iterate
from aftune.commands.resumable import Steps
from aftune.commands.training import check_train_args
from aftune.config import (
    AlignConfig,
    Common,
    EvalConfig,
    GRPORunConfig,
    IterateConfig,
    field_types,
    flag_name_of,
    typed_value,
)
from aftune.io import InputError, atomic_write_json
from aftune.training.methods import METHODS, get_method
from aftune.training.online import check_semi_online
from aftune.yaml_io import YamlDoc, read_yaml, read_yaml_mapping

COMMANDS: dict[str, type] = {"align": AlignConfig, "iterate": IterateConfig, "grpo": GRPORunConfig}
RUNNERS = {"align": run_align, "iterate": run_iterate, "grpo": run_grpo}
TOP_KEYS = ("name", "out", "report", "base", "plan", "sample_k", "data_seed", "seeds", "arms", "diag_every", "bf16")
GRID_ONLY = ("methods", "k", "beta", "lambda", "beta_auto", "grids", "protocols")
# Set by the study for every arm: the task and data (the paired tests need every arm on the same questions), the
# start model, the folder, and the evaluation every arm's per-round accuracy is measured with.
RESERVED = (
    *(f.name for f in dataclasses.fields(Common)),
    "model",
    "out",
    "candidates",
    "eval_split",
    "eval_questions",
)
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def arm_key_line(doc: YamlDoc, arm: str, key: str | None) -> int | None:
    """The line of `key` inside arm `arm` of the `arms:` mapping (the arm's own line when the arm lacks it)."""
    return doc.line(("arms", arm) if key is None else ("arms", arm, key))


def load_arms_study(path: str | Path) -> ArmsStudy:
    """Parse and check an arms study YAML; every mistake is an InputError naming the file (and key)."""
    path = Path(path)
    doc = read_yaml_mapping(path, "experiment file")
    data, err = doc.data, doc.error

    for key in data:
        if key in GRID_ONLY:
            raise err(
                str(key),
                "a study with `arms:` takes no grid keys (methods, k, beta, lambda, ...): give each arm's "
                "settings inside the arm",
            )
        if key not in TOP_KEYS:
            raise err(str(key), f"unknown key (known: {', '.join(TOP_KEYS)})")
    plan = parse_plan(doc)
    seeds = num_list(data, "seeds", int, [0], err)
    check_scalars(data, err)
    report = parse_report(data, err)
    name = str(data.get("name", path.stem))
    raw = data.get("arms")
    if not isinstance(raw, dict) or not raw:
        raise err("arms", "expected a mapping of arm names to {command: align | iterate | grpo, <its fields>}")
    if CONTROL_ARM not in raw:
        raise err("arms", f"needs an arm named '{CONTROL_ARM}': the matched control every arm is compared with")
    arms = tuple(_arm(str(n), spec, doc) for n, spec in raw.items())
    study = ArmsStudy(
        name=name,
        out=str(data.get("out", f"runs/experiments/{name}")),
        plan=plan,
        seeds=seeds,
        arms=arms,
        data_seed=int(data.get("data_seed", 0)),
        sample_k=data.get("sample_k"),
        diag_every=int(data.get("diag_every", 0)),
        bf16=bool(data.get("bf16", False)),
        report=report,
    )
    if study.sample_k is not None and study.sample_k < 2:
        raise err("sample_k", f"must be >= 2, got {study.sample_k}")
    placeholder = SeedFiles(
        common=dict(task="arith", task_args="", seed=0, quiet=True, bf16=study.bf16),
        vft_model="vft/model",
        candidates={study.kmax: Path("candidates.jsonl")},
        assess=Path("assess_candidates.jsonl"),
        eval_args={},
    )
    for arm in arms:  # the commands' own checks now, not after the VFT models have trained
        try:
            check_arm(arm, arm_config(study, arm, placeholder, Path("arm")), path)
        except InputError as e:
            raise _in_arm(e, arm.name, doc) from None
    return study


def _arm(name: str, spec: Any, doc: YamlDoc) -> Arm:
    err = doc.error  # its dotted keys find an arm whose name holds dots too
    where = f"arms.{name}"
    if not ARM_NAME.match(name):
        raise err(where, "an arm name is a folder name: letters, digits, '_', '-', '.' (not starting with '.')")
    if not isinstance(spec, dict):
        raise err(where, "expected a mapping {command: align | iterate | grpo, <its fields>}")
    command = spec.get("command")
    if not isinstance(command, str) or command not in COMMANDS:
        raise err(f"{where}.command", f"expected one of: {', '.join(COMMANDS)}; got {command!r}")
    cls = COMMANDS[command]
    known = {flag_name_of(f.name): f.name for f in dataclasses.fields(cls)}  # `lambda` -> lambda_
    types_ = field_types(cls)
    fields: dict[str, Any] = {}
    shared = False
    for key, value in spec.items():
        key = str(key).replace("-", "_")
        if key == "command":
            continue
        if key == "candidates" and command == "iterate":
            if value != "shared":
                raise err(
                    f"{where}.candidates",
                    f"an iterate arm takes `candidates: shared` (round 1 on the seed's sampling pass) or samples "
                    f"round 1 itself; got {value!r}",
                )
            shared = True
            continue
        if key not in known:
            settable = sorted(k for k, f in known.items() if f not in RESERVED)
            raise err(f"{where}.{key}", f"unknown field of `aftune {command}` (known: {', '.join(settable)})")
        if known[key] in RESERVED:
            raise err(f"{where}.{key}", "set by the study for every arm (same task, data, start model and eval)")
        fields[known[key]] = typed_value(value, *types_[known[key]], doc, f"{where}.{key}", strict_str=True)
    if command in ("align", "iterate") and "method" not in fields:
        raise err(f"{where}.method", f"an {command} arm needs a method (one of: {', '.join(METHODS)})")
    if shared and fields.get("fresh_questions"):
        raise err(
            f"{where}.candidates",
            "`candidates: shared` gives round 1 the first questions, not round 1's slice of --fresh-questions; "
            "use one or the other",
        )
    return Arm(name, command, fields, shared)


def _bare_message(e: InputError) -> str:
    """An InputError's message without its 'file: line N: field 'x': ' prefix."""
    msg = str(e)
    for part in (
        None if e.path is None else f"{e.path}: ",
        None if e.line is None else f"line {e.line}: ",
        None if e.field is None else f"field '{e.field}': ",
    ):
        if part and msg.startswith(part):
            msg = msg[len(part) :]
    return msg


def _in_arm(e: InputError, arm: str, doc: YamlDoc) -> InputError:
    """A command's InputError (field = its flag) restated for the YAML: file, line and arms.<arm>.<field>."""
    field = (e.field or "").lstrip("-").replace("-", "_")
    key = f"arms.{arm}.{field}" if field else f"arms.{arm}"
    return InputError(_bare_message(e), doc.path, arm_key_line(doc, arm, field or None), key)


def check_arm(arm: Arm, cfg, path: Path) -> None:
    """The command's own checks of the arm's config (those that need no files)."""
    check_train_args(cfg)
    if arm.command == "grpo":
        check_grpo(replace(cfg, model=str(path.parent)))  # a saved folder; the VFT model may not exist yet
        return
    check_semi_online(get_method(cfg.method), cfg.beta_auto, 1, cfg.resample_every)
    if arm.command == "iterate":
        check_iterate(cfg)


def arm_config(study: ArmsStudy, arm: Arm, files: SeedFiles, d: Path):
    """The arm's command config for one seed: the study's defaults for the command, then the arm's fields.

    align: the `continue` protocol's run (demo.align_config: align_steps at align_lr from the VFT model) on the
      seed's k-candidate pass, every candidate used (max_candidates = k + 1 with the reference), and semi-online
      resampling, when asked for, drawn like that pass (k, temperature, max new tokens).
    iterate: the same align settings for every round, and per round one sampling pass of the size of the shared
      one (n_sample questions x k, its temperature), so N rounds generate about N x one pass; each round's
      accuracy on the test split.
    grpo: the command's defaults, sampling at the plan's temperature and length.
    Every arm starts from the seed's VFT model, on the seed's task and data, and writes to d/run."""
    plan, kmax, run = study.plan, study.kmax, arm_run_dir(d)
    cands = files.candidates[kmax]
    if arm.command == "grpo":
        base = GRPORunConfig(
            **files.common,
            model=files.vft_model,
            out=str(run),
            temperature=plan.temperature,
            max_new_tokens=plan.max_new_tokens,
            eval_split="test",
            eval_batch_size=64,
        )
        return replace(base, **arm.fields)
    align = replace(
        align_config(plan, files.common, files.vft_model, cands, files.assess, run, arm.fields["method"]),
        max_candidates=kmax + 1,
        diag_every=study.diag_every,
        resample_k=kmax,
        resample_temperature=plan.temperature,
        resample_max_new_tokens=plan.max_new_tokens,
    )
    if arm.command == "align":
        return replace(align, **arm.fields)
    values = {f.name: getattr(align, f.name) for f in dataclasses.fields(AlignConfig)}
    values.update(
        candidates=str(cands) if arm.shared_candidates else "",
        n_questions=plan.n_sample,
        k=kmax,
        temperature=plan.temperature,
        max_new_tokens=plan.max_new_tokens,
        sample_batch_size=32,
        eval_split="test",
        eval_batch_size=64,
    )
    return replace(IterateConfig(**values), **arm.fields)


def final_model(command: str, run: Path) -> str:
    """The model an arm ends with, from its command's metrics.json."""
    m = json.loads((run / METRICS).read_text())
    return m["rounds"][-1]["model"] if command == "iterate" else m["model"]


def check_arm_folders(root: Path, study: ArmsStudy, seeds: tuple[int, ...], config_path: str | Path) -> None:
    """A finished arm is skipped on rerun, so an arm whose settings changed must not reuse its old folder."""
    for seed in seeds:
        for arm in study.arms:
            rec = arm_dir(root, seed, arm.name) / ARM_SPEC
            if rec.exists():
                old = json.loads(rec.read_text())
                new = json.loads(json.dumps(arm.spec))
                if old != new:
                    diff = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
                    raise InputError(
                        f"{rec.parent} was run with other settings ({', '.join(diff)}): rename the arm, or remove "
                        "its folders to run it again",
                        config_path,
                        arm_key_line(read_yaml(config_path), arm.name, None),
                        f"arms.{arm.name}",
                    )


def run_arms(
    config_path: str | Path, out: str | None = None, quiet: bool = False, seeds: tuple[int, ...] | None = None
) -> dict:
    """Run (or resume) an arms study, then (over all seeds) write results-online.md, results.json and plots."""
    study = load_arms_study(config_path)
    if out is not None:
        study = replace(study, out=out)
    check_seeds(seeds, study.seeds, config_path)
    root, report = Path(study.out), Path(study.report or study.out)
    todo = tuple(seeds) if seeds is not None else study.seeds
    root.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(study.plan, study.data_seed, study.bf16, study.kmax, study.diag_every)
    check_fingerprint(root, fp, config_path)
    check_arm_folders(root, study, todo, config_path)
    keep_config(config_path, report)
    step = Steps(root, "experiment", announce_skips=not quiet)

    for seed in todo:
        files = seed_steps(step, root, seed, study.plan, study.data_seed, study.bf16, quiet, study.kmax)
        for arm in study.arms:
            d = arm_dir(root, seed, arm.name)
            cfg = arm_config(study, arm, files, d)
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_json(d / ARM_SPEC, arm.spec)
            run = Path(cfg.out)
            step(f"seed{seed}/online {arm.name}", run / METRICS, run_and_clean, RUNNERS[arm.command], cfg)
            step(
                f"seed{seed}/eval online {arm.name}",
                d / EVAL,
                run_eval,
                EvalConfig(**files.eval_args, model=final_model(arm.command, run), out=str(d / EVAL)),
            )

    n_runs = len(study.arms) * len(study.seeds)
    if set(todo) != set(study.seeds):
        print(f"[experiment] seeds {list(todo)} done; run without --seeds to write the results")
        return {"results": None, "n_runs": n_runs, "skipped": step.skipped, "timings": step.timings, "arms": None}
    results = write_arms_results(root, report, study)
    print(f"[experiment] results: {report / 'results-online.md'}")
    return {
        "results": str(report / "results-online.md"),
        "n_runs": n_runs,
        "skipped": step.skipped,
        "timings": step.timings,
        "arms": results["arms"],
    }
