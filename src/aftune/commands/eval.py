"""`aftune eval`: greedy-decoding accuracy on a split (+ assessment accuracy on a candidates file)."""

from __future__ import annotations

import time
from pathlib import Path

from aftune.commands.common import load_for_inference, load_split, read_candidate_files, tasks_for
from aftune.config import EvalConfig, save_config
from aftune.evaluation.accuracy import greedy_accuracy
from aftune.evaluation.assessment import assessment_metrics
from aftune.io import atomic_write_json, write_jsonl
from aftune.prompting import resolve_prompt_format
from aftune.sampling.engines import open_engine
from aftune.scoring import score_texts


def run_eval(cfg: EvalConfig) -> dict:
    """OUT (metrics JSON) and OUT.predictions.jsonl (one graded prediction per question); returns the metrics."""
    tasks = tasks_for(cfg)
    items = load_split(tasks, cfg.split, cfg.n_questions)
    eng = open_engine(cfg.backend, cfg.model, cfg.inference_dtype, trust_remote_code=cfg.trust_remote_code)
    model, tok = eng.model, eng.tokenizer
    fmt = resolve_prompt_format(cfg.chat_template, tok)
    t0 = time.time()
    res = greedy_accuracy(
        model,
        tok,
        items,
        cfg.max_new_tokens,
        cfg.batch_size,
        progress=not cfg.quiet,
        prompt_format=fmt,
        generate=eng.generate,
    )
    res["backend"] = eng.name
    res["eval_seconds"] = round(time.time() - t0, 1)
    out = Path(cfg.out)
    write_jsonl(out.with_suffix(".predictions.jsonl"), res.pop("predictions"))
    if cfg.candidates:
        groups = read_candidate_files(cfg.candidates)
        if model is None:  # scoring runs on the HF model (vLLM only sampled)
            model, tok = load_for_inference(cfg.model, cfg.inference_dtype, trust_remote_code=cfg.trust_remote_code)
        scores, refs = score_texts(model, tok, groups, progress=not cfg.quiet, end=fmt.response_end(tok))
        res["assessment"] = {k: v for k, v in assessment_metrics(groups, scores, refs).items() if k != "acc_vs_k"}
    res.update({"model": cfg.model, "task": cfg.task, "split": cfg.split})
    atomic_write_json(out, res)
    save_config(cfg, out.parent, f"{out.stem}.config.yaml")
    return res
