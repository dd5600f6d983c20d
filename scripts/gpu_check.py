"""The GPU check: one prepared command that measures and smoke-tests aftune on one CUDA device, writing one table.

Stages (each timed, each allowed to fail without stopping the others; the table says what failed and why):
  1. bench   bench/run_all.py on the device in bf16 at GSM8K lengths and vocab 152k / 262k: one align step of
             aftune vs TRL's DPOTrainer (tokens/s, peak memory), aftune's sampler vs HF `generate`, and the
             packed / chunked-head ablations.
  2. head    the chunked LM head on the device: score_groups with the chunked head (the fast path, asserted
             active) against full logits (chunk_size=0) at vocab 262k in bf16 autocast: values, gradients,
             peak memory of each.
  3. engines `aftune align` (DPO, bf16) as a plain run and under `accelerate launch` with the shipped FSDP2,
             DeepSpeed ZeRO-2 and ZeRO-3 configs on one process; each run's losses are compared with the plain
             run's, and its OUT/model is loaded back with `from_pretrained`.

    python scripts/gpu_check.py                        # on a CUDA machine: the full check (about 6 minutes on an H200)
    python scripts/gpu_check.py --device cpu --toy     # toy sizes on CPU, seconds: keeps the script from rotting
    bash scripts/gpu_check.sh                          # a GPU machine without pip access: installs .whl/ first

Writes OUT/gpu_check.md and OUT/gpu_check.json (OUT: --out, default $OUT or bench/out/gpu_check) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = ROOT / ".gpu" / "gsm8k_lengths.json"  # written here by bench/run_all.py --save-lengths, carried along


def versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "accelerate", "peft", "trl", "deepspeed"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - an absent or broken optional package is reported, not fatal
            info[mod] = f"unavailable ({type(e).__name__})"
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return info


DEADLINE = [float("inf")]  # perf_counter time by which every stage must have ended (--deadline)


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run cmd with its output in `log`; (exit code, seconds). A timeout (its own, or the deadline's) is 124."""
    t0 = time.perf_counter()
    timeout = min(timeout, DEADLINE[0] - t0)
    if timeout < 5:
        log.write_text("skipped: the --deadline has passed\n")
        return 124, 0.0
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def tail(log: Path, n: int = 1) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return " | ".join(lines[-n:])[-300:]


# --------------------------------------------------------------------------- 1. bench


def stage_bench(args, out: Path) -> dict:
    cmd = [sys.executable, "bench/run_all.py", "--device", args.device, "--dtypes", "bf16", "--no-synthetic"]
    cmd += ["--no-kto", "--no-real-model", "--no-vllm", "--out", str(out / "bench")]
    if args.toy:
        cmd += ["--smoke", "--vocabs", "32000"]
    else:
        cmd += ["--vocabs", "152064,262144", "--runs", "3", "--questions", "4"]
    if LENGTHS.exists():
        cmd += ["--lengths", str(LENGTHS)]
    rc, s = run(cmd, out / "bench.log", args.bench_timeout)
    table, rows = out / "bench" / "run_all.md", out / "bench" / "run_all.json"
    ratios = [f"{r['kind']} {r['shape'].split(',')[-1].strip()} {r['ratio']:.2f}x" for r in _rows(rows)]
    return {"rc": rc, "s": s, "table": table.read_text() if table.exists() else "", "last": "; ".join(ratios)}


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


# --------------------------------------------------------------------------- 2. chunked head


def stage_head(args, out: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from aftune import scoring

    dev = args.device
    vocab, hidden, layers = (2048, 64, 1) if args.toy else (262144, 640, 2)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=hidden // 4 if args.toy else 256,
        intermediate_size=4 * hidden,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).to(dev)
    assert scoring._find_head(model) is not None, "the chunked-head plan was not found: the fast path is off"
    g = torch.Generator().manual_seed(1)
    k, p_len, r_len = 8, (12 if args.toy else 65), (16 if args.toy else 125)  # GSM8K means (Gemma tokenizer)
    prompts = [torch.randint(2, vocab, (p_len,), generator=g).tolist() for _ in range(2)]
    cands = [
        [torch.randint(2, vocab, (int(r_len * (0.5 + i / k)),), generator=g).tolist() for i in range(k)]
        for _ in prompts
    ]

    def one(chunk):
        model.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            res = scoring.score_groups(model, prompts, cands, 0, chunk_size=chunk)
        res.logp_sum.sum().backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else float("nan")
        grad = model.get_output_embeddings().weight.grad.float().clone()
        return res.logp_sum.detach().float(), grad, s, peak

    one(None)  # warm-up (kernels, allocator)
    v_c, g_c, s_c, m_c = one(None)
    v_f, g_f, s_f, m_f = one(0)
    rel = ((g_c - g_f).norm() / g_f.norm()).item()
    return {
        "vocab": vocab,
        "tokens": sum(len(c) for cs in cands for c in cs),
        "max_abs_diff_logp_sum": (v_c - v_f).abs().max().item(),
        "grad_rel_diff": rel,
        "chunked": {"s": s_c, "peak_mb": m_c},
        "full": {"s": s_f, "peak_mb": m_f},
        # bf16 matmuls in a different order: sums of ~100 token log-probs agree to about 1e-1 nats
        "ok": (v_c - v_f).abs().max().item() < 0.5 and rel < 2e-2,
    }


# --------------------------------------------------------------------------- 3. training engines


ENGINES = {  # name -> accelerate config (None: plain, no launcher)
    "plain": None,
    "fsdp2": "configs/accelerate/fsdp.yaml",
    "zero2": "configs/accelerate/deepspeed_zero2.yaml",
    "zero3": "configs/accelerate/deepspeed_zero3.yaml",
}


def stage_engines(args, out: Path) -> dict:
    work = Path(args.work) / "engines"  # models and checkpoints stay out of OUT (the device tool returns 8 files)
    work.mkdir(parents=True, exist_ok=True)
    aftune = [sys.executable, "-m", "aftune.cli"]
    task = ["--task", "arith", "--task-args", "n_train=16,n_validation=4,n_test=4", "--quiet"]
    cands = work / "candidates.jsonl"
    n_steps = 2 if args.toy else 3
    rc, s = run(
        [*aftune, "sample", "--model", "arith-base", *task, "--out", str(cands), "--k", "4", "--max-new-tokens", "96"],
        work / "sample.log",
        args.step_timeout,
    )
    sampled = f"{sum(1 for _ in open(cands))} questions sampled" if rc == 0 else ""
    rows = {"sample": {"rc": rc, "s": s, "last": sampled}}
    if rc != 0:
        return rows
    align = ["align", "--model", "arith-base", "--candidates", str(cands), "--method", "dpo", *task]
    align += ["--n-train", "16", "--batch-size", "4", "--max-steps", str(n_steps), "--lr", "1e-4", "--no-resume"]
    align += ["--save-steps", "1000", "--logging-steps", "1", "--max-candidates", "4"]
    align += ["--bf16"] if args.device == "cuda" else []
    engines = ENGINES if args.device == "cuda" else {"plain": None}  # accelerate turns these into DDP on CPU
    worker = [str(Path(__file__).resolve()), "--engine-worker"]  # `aftune align`, instrumented (engine_worker)
    for name, cfg in engines.items():
        run_out = work / name
        launcher = [] if cfg is None else ["-m", "accelerate.commands.launch", "--config_file", cfg]
        launcher += [] if cfg is None else ["--num_processes", "1", "--main_process_port", "29555"]
        cmd = [sys.executable, *launcher, *worker, *align, "--out", str(run_out)]
        rc, s = run(cmd, work / f"{name}.log", args.step_timeout)
        row = {"rc": rc, "s": s, "last": tail(work / f"{name}.log", 2)}
        row.update(_losses_and_model(run_out))
        if (run_out / "engine_worker.json").exists():
            row.update(json.loads((run_out / "engine_worker.json").read_text()))
        rows[name] = row
    with open(out / "engines.log", "w") as f:  # the end of every run's log, in one file
        for log in sorted(work.glob("*.log")):
            f.write(f"==> {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]) + "\n")
    plain = rows.get("plain", {}).get("losses")
    for r in rows.values():
        if plain and r.get("losses"):
            n = min(len(plain), len(r["losses"]))
            r["max_loss_diff_vs_plain"] = max(abs(a - b) for a, b in zip(plain[:n], r["losses"][:n]))
    return rows


def engine_worker(argv: list[str]) -> None:
    """`aftune align argv` in this process, recording what ran: the engine accelerate set up, whether the weights
    are sharded (FSDP2 DTensors / ZeRO-3 partitions), how often the chunked head and the full-logits path scored,
    and the peak CUDA memory. Written to OUT/engine_worker.json next to the run's metrics."""
    import aftune.scoring as sc
    from aftune.cli import main as cli_main
    from aftune.training.trainer import AFTTrainer

    rec = {"engine": None, "sharded": False, "chunks": 0, "full_logits": 0}
    chunk, token = sc._chunk_logps, sc._token_logps

    def count(key, fn):
        return lambda *a, **k: rec.__setitem__(key, rec[key] + 1) or fn(*a, **k)

    sc._chunk_logps, sc._token_logps = count("chunks", chunk), count("full_logits", token)
    init = AFTTrainer.__init__

    def recording_init(self, *a, **k):
        init(self, *a, **k)
        rec["engine"] = self.accelerator.distributed_type.value

    AFTTrainer.__init__ = recording_init
    orig_step = AFTTrainer.training_step

    def recording_step(self, model, *a, **k):
        from torch.distributed.tensor import DTensor

        rec["sharded"] |= any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())
        return orig_step(self, model, *a, **k)

    AFTTrainer.training_step = recording_step
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sys.argv = ["aftune", *argv]
    try:
        cli_main()
    finally:
        if torch.cuda.is_available():
            rec["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "engine_worker.json").write_text(json.dumps(rec))


def _losses_and_model(run_out: Path) -> dict:
    """Per-step losses from the run's metrics (trainer log history), and whether OUT/model loads back."""
    row: dict = {}
    for f in (run_out / "metrics.json", run_out / "trainer_state.json"):
        if f.exists():
            hist = json.loads(f.read_text())
            hist = hist.get("log_history", hist.get("history", [])) if isinstance(hist, dict) else hist
            losses = [h["loss"] for h in hist if isinstance(h, dict) and "loss" in h]
            if losses:
                row["losses"] = losses
                break
    if (run_out / "model").exists():
        try:
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(run_out / "model", use_safetensors=True)
            row["model_loads"] = all(torch.isfinite(p).all().item() for p in m.parameters())
        except Exception as e:  # noqa: BLE001 - reported in the table
            row["model_loads"] = f"{type(e).__name__}: {str(e)[:120]}"
    return row


# --------------------------------------------------------------------------- report


def report(res: dict) -> str:
    v = res["versions"]
    md = [
        f"<!-- generated by `python scripts/gpu_check.py {' '.join(sys.argv[1:])}` in {res['wall_s']:.0f} s -->",
        f"Device: {v['device']}; torch {v['torch']}, transformers {v['transformers']}, accelerate "
        f"{v['accelerate']}, peft {v['peft']}, TRL {v['trl']}, DeepSpeed {v['deepspeed']}.",
        "",
        "| stage | result | time | detail |",
        "|---|---|---|---|",
    ]
    for name in ("bench", "head", "engines"):
        r = res.get(name)
        if r is None:  # not among --stages
            continue
        if "error" in r:
            md.append(f"| {name} | FAILED | | {r['error']} |")
        elif name == "bench":
            md.append(f"| bench | {'ok' if r['rc'] == 0 else 'rc ' + str(r['rc'])} | {r['s']:.0f} s | {r['last']} |")
        elif name == "head":
            md.append(
                f"| chunked head, vocab {r['vocab']:,}, {r['tokens']} tokens | {'ok' if r['ok'] else 'MISMATCH'} | "
                f"{r['chunked']['s']:.2f} s vs {r['full']['s']:.2f} s full | max abs diff of logp sums "
                f"{r['max_abs_diff_logp_sum']:.3g}, head grad rel diff {r['grad_rel_diff']:.2g}; peak "
                f"{r['chunked']['peak_mb']:.0f} MiB chunked vs {r['full']['peak_mb']:.0f} MiB full |"
            )
        else:
            for eng, e in r.items():
                ok = "ok" if e["rc"] == 0 else f"rc {e['rc']}"
                losses = ", ".join(f"{x:.4f}" for x in e.get("losses", []))
                detail = f"losses [{losses}]" if losses else e.get("last", "")
                if "max_loss_diff_vs_plain" in e:
                    detail += f"; max diff vs plain {e['max_loss_diff_vs_plain']:.2g}"
                if "model_loads" in e:
                    detail += f"; OUT/model loads: {e['model_loads']}"
                if e.get("engine"):
                    detail += (
                        f"; engine {e['engine']}, sharded {e['sharded']}, chunked-head calls {e['chunks']}, "
                        f"full-logits calls {e['full_logits']}"
                    )
                if e.get("peak_mb"):
                    detail += f", peak {e['peak_mb']:.0f} MiB"
                md.append(f"| engines: {eng} | {ok} | {e['s']:.0f} s | {detail} |")
    text = "\n".join(md) + "\n"
    if res.get("bench", {}).get("table"):
        text += "\n## bench/run_all.py\n\n" + res["bench"]["table"]
    return text


def main() -> int:
    if sys.argv[1:2] == ["--engine-worker"]:
        engine_worker(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--toy", action="store_true", help="toy sizes (seconds on CPU)")
    ap.add_argument("--stages", default="bench,head,engines")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out" / "gpu_check"))
    ap.add_argument("--work", default="", help="scratch folder for models and checkpoints (default: a temp dir)")
    ap.add_argument("--bench-timeout", type=float, default=210)
    ap.add_argument("--step-timeout", type=float, default=90, help="per sample / align run of the engines stage")
    ap.add_argument("--deadline", type=float, default=500, help="seconds after which no stage starts a run")
    args = ap.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    DEADLINE[0] = time.perf_counter() + args.deadline
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict = {"versions": versions()}
    print(json.dumps(res["versions"]), flush=True)
    for name in args.stages.split(","):
        t = time.perf_counter()
        try:
            res[name] = {"bench": stage_bench, "head": stage_head, "engines": stage_engines}[name](args, out)
        except Exception as e:  # noqa: BLE001 - one stage failing must not lose the others' results
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            traceback.print_exc()
        print(f"stage {name}: {time.perf_counter() - t:.0f} s", flush=True)
        res["wall_s"] = time.perf_counter() - t0
        (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    text = report(res)
    (out / "gpu_check.md").write_text(text)
    print(text)
    failed = [n for n in args.stages.split(",") if "error" in res[n]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
