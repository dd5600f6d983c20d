"""`aftune assess`: can each model tell right reasoning from wrong? Assessment metrics, report and plots."""

from __future__ import annotations

from pathlib import Path

from aftune.commands.common import load_examples, load_for_inference, read_candidate_files, single_task
from aftune.config import AssessConfig, save_config
from aftune.evaluation.assessment import assessment_metrics
from aftune.evaluation.report import assessment_report
from aftune.io import InputError
from aftune.prompting import resolve_prompt_format
from aftune.records import Group, read_groups
from aftune.sampling.arguments import sampling_config
from aftune.sampling.engines import Engine, open_engine, resolve_backend
from aftune.sampling.store import builtin_engine_info, sample_candidates
from aftune.scoring import score_texts


def assess_models(
    models: dict[str, tuple],
    groups: list[Group],
    out_dir: Path,
    batch_size: int = 16,
    progress: bool = False,
    chat_template: str = "auto",
) -> dict[str, dict]:
    """Score the same candidates under each (model, tokenizer) and write assessment.{json,md} + plots."""
    named_metrics, named_scores = {}, {}
    for name, (model, tok) in models.items():
        end = resolve_prompt_format(chat_template, tok).response_end(tok)
        scores, refs = score_texts(model, tok, groups, batch_size, progress, end=end)
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
    models = {
        n: load_for_inference(p, cfg.inference_dtype, trust_remote_code=cfg.trust_remote_code)
        for n, p in zip(names, paths)
    }
    out.mkdir(parents=True, exist_ok=True)  # after the models load: a bad path leaves OUT untouched
    save_config(cfg, out)
    if cfg.candidates:
        groups = read_candidate_files(cfg.candidates)
    else:
        task = single_task(cfg)
        examples = load_examples(task, cfg.split)[: cfg.n_questions]
        model, tok = models[names[0]]
        eng = (
            Engine("hf", model, tok, builtin_engine_info(model))
            if resolve_backend(cfg.backend, paths[0]) == "hf"
            else open_engine("vllm", paths[0], cfg.inference_dtype, trust_remote_code=cfg.trust_remote_code)
        )
        fmt = resolve_prompt_format(cfg.chat_template, tok)
        path = out / "candidates.jsonl"
        sample_candidates(
            model,
            tok,
            task,
            examples,
            path,
            sampling_config([task], fmt, tok, cfg, seed=cfg.seed, batch_size=cfg.batch_size),
            model_name=paths[0],
            progress=not cfg.quiet,
            prompt_format=fmt,
            generate=eng.generate,
            engine=eng.info,
        )
        groups = read_groups(path)
    return assess_models(models, groups, out, cfg.batch_size, progress=not cfg.quiet, chat_template=cfg.chat_template)
