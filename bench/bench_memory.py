"""Benchmark: peak memory and time of one training step at a 262,144-token vocabulary (Gemma 3's).

One step = forward + backward of the candidates' log-probs and a DPO loss over all (better, worse) pairs with
precomputed reference log-probs; no optimizer step (its state is the same for every tool). Per question: a
prompt of --prompt-len tokens and k candidates of --min-len..--max-len tokens (EOS included), half "better"
(rank 0), half "worse" (rank 1), so k/2 * k/2 pairs.

* aftune-chunked: score_groups (prompt once per question, its KV cache shared by the k candidates; the LM head
  applied chunk by chunk to response positions only) -> aftune.losses.dpo_loss over all pairs.
* aftune-full: the same with chunk_size=0: full [positions, vocab] logits and log_softmax (the previous path).
* trl-dpo: TRL's DPOTrainer (precompute_ref_log_probs=True) on every (better, worse) pair as one row, so each
  candidate (with its prompt) is run k/2 times, as DPO on all pairs requires. Timed: its own `training_step`
  (compute_loss, backward) on a batch from its own collator. TRL >= 1.x scores through its fused chunked
  log-prob head (trl.kernels.ChunkedLogProbFunction); on CPU it scores every position, prompts included.

Model: Llama-shaped, width of Gemma-3-270M (hidden 640, 4 heads of 256, 1 KV head, MLP 2048), --layers layers,
tied embeddings, vocab 262,144 (168M of its parameters are the embedding). fp32 by default (--bf16: autocast).

Every configuration runs in its own process, interleaved (A, B, C, A, B, C, ...). Memory per step:
* alloc: peak of (bytes allocated - bytes freed) by torch's CPU allocator during the step, from the
  profiler's allocation events: exact, independent of the allocator's caching and of other processes;
* rss: peak resident set size during the step (sampled every ms) minus the RSS just before it;
* maxrss: ru_maxrss after the step minus the RSS before it (a lifetime peak: valid when the step sets it,
  which the row says).
--cap-gib N additionally finds, per tool, the most questions per step that still run under RLIMIT_AS = N GiB.

    python bench/bench_memory.py                     # table, 2 rounds
    python bench/bench_memory.py --cap-gib 8         # + largest batch under an 8 GiB address-space cap
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings

TOOLS = ("aftune-chunked", "aftune-full", "trl-dpo")
VOCAB = 262_144


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _questions(args, b: int):
    """b questions as text for the word-level tokenizer ("w<i>" = token i + 3): prompt, k responses + EOS."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    words = lambda n: " ".join(f"w{i - 3}" for i in torch.randint(3, VOCAB, (n,), generator=g).tolist())  # noqa: E731
    out = []
    for _ in range(b):
        lens = torch.randint(args.min_len, args.max_len + 1, (args.k,), generator=g).tolist()
        out.append((words(args.prompt_len), [" " + words(n - 1) + " </s>" for n in lens]))
    return out


def _model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        use_cache=False,
    )
    return LlamaForCausalLM(cfg).train()


class Aftune:
    def __init__(self, args, tok, questions, chunk_size):
        import torch

        from aftune.scoring import score_groups

        self.model, self.chunk, self.bf16 = _model(args), chunk_size, args.bf16
        self.prompts = [tok(p)["input_ids"] for p, _ in questions]
        self.cands = [[tok(c, add_special_tokens=False)["input_ids"] for c in cs] for _, cs in questions]
        k = args.k
        self.ranks = torch.tensor([[0] * (k // 2) + [1] * (k - k // 2)] * len(questions))
        with torch.no_grad():  # the reference = the initial policy, computed once (as precomputed refs are)
            self.ref = score_groups(self.model, self.prompts, self.cands, 0).logp_sum.view(len(questions), k)
        self.tokens = sum(len(p) for p in self.prompts) + sum(len(c) for cs in self.cands for c in cs)

    def step(self):
        import torch

        from aftune.losses import dpo_loss
        from aftune.scoring import score_groups, to_padded

        self.model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            s = score_groups(self.model, self.prompts, self.cands, 0, chunk_size=self.chunk)
        pol, valid = to_padded(s.logp_sum.float(), s.group_index, len(self.prompts))
        dpo_loss(pol, self.ref, self.ranks, valid, beta=0.1).mean().backward()


class TRL:
    def __init__(self, args, tok, questions, out_dir):
        import datasets
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        k = args.k
        better, worse = range(k // 2), range(k // 2, k)
        rows = [
            {"prompt": p, "chosen": cs[i], "rejected": cs[j]} for p, cs in questions for i in better for j in worse
        ]
        os.environ["TQDM_DISABLE"] = "1"
        datasets.disable_progress_bars()
        cfg = DPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=len(rows),
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=k // 2,
            bf16=args.bf16,
            use_cpu=True,
            report_to=[],
            max_length=None,
            beta=0.1,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = DPOTrainer(
                model=_model(args), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok
            )
        self.trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop otherwise
        self.batch = next(iter(self.trainer.get_train_dataloader()))
        # the ids TRL trains on must be the ones aftune scores
        ds = self.trainer.train_dataset
        for r, row in zip(ds, rows):
            assert r["prompt_ids"] == tok(row["prompt"])["input_ids"], "prompt tokenised differently"
            assert r["chosen_ids"] == tok(row["chosen"], add_special_tokens=False)["input_ids"]
        self.tokens = int(self.batch["attention_mask"].sum())

    def step(self):
        t = self.trainer
        t.model.zero_grad(set_to_none=True)
        t.training_step(t.model, self.batch)


def _peak_alloc(fn) -> float:
    """MiB: peak of allocated - freed bytes (torch CPU allocator) while fn() runs (see tests/test_scoring.py)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import make_tokenizer

    tok = make_tokenizer(VOCAB)
    questions = _questions(args, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        tool = args._child
        side = (
            TRL(args, tok, questions, tmp)
            if tool == "trl-dpo"
            else Aftune(args, tok, questions, (args.chunk_size or None) if tool == "aftune-chunked" else 0)
        )
        if args.cap_gib:  # feasibility probe: one step under the cap (set before anything was built)
            side.step()
            return {"ok": True}
        gc.collect()
        rss0, maxrss0 = _rss_mb(), _maxrss_mb()
        peak, done = [rss0], []

        def sample():
            while not done:
                peak[0] = max(peak[0], _rss_mb())
                time.sleep(0.001)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        alloc = _peak_alloc(side.step)
        dt = time.perf_counter() - t0
        done.append(1)
        th.join()
        maxrss1 = _maxrss_mb()
    return {
        "s": dt,
        "alloc_mb": alloc,
        "rss_mb": peak[0] - rss0,
        "maxrss_mb": maxrss1 - rss0,
        "maxrss_valid": maxrss1 > maxrss0,
        "tokens": side.tokens,
        "base_rss_mb": rss0,
    }


def _argv(args, tool, batch, cap=0.0):
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        tool,
        "--batch",
        str(batch),
        "--k",
        str(args.k),
        "--prompt-len",
        str(args.prompt_len),
        "--min-len",
        str(args.min_len),
        "--max-len",
        str(args.max_len),
        "--layers",
        str(args.layers),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--cap-gib",
        str(cap),
        "--chunk-size",
        str(args.chunk_size),
    ] + (["--bf16"] if args.bf16 else [])


def run_child(args, tool, batch, cap=0.0):
    out = subprocess.run(_argv(args, tool, batch, cap), capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        return None, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def largest_batch(args, tool, cap: float, limit: int) -> tuple[int, str]:
    """Most questions per step (<= limit) whose step runs under RLIMIT_AS = cap GiB: doubling, then bisection."""
    lo, hi, why = 0, None, ""
    b = 1
    while hi is None and b <= limit:
        ok, err = run_child(args, tool, b, cap)
        if ok:
            lo, b = b, b * 2
        else:
            hi, why = b, err.strip().splitlines()[-1] if err.strip() else "failed"
    if hi is None:
        return lo, f"fits at the search limit {limit}"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, err = run_child(args, tool, mid, cap)
        if ok:
            lo = mid
        else:
            hi, why = mid, err.strip().splitlines()[-1] if err.strip() else "failed"
    return lo, f"fails at {hi}: {why[:160]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--batch", type=int, default=1, help="questions per step")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--min-len", type=int, default=100, help="shortest response (tokens, EOS included)")
    ap.add_argument("--max-len", type=int, default=250)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on every side")
    ap.add_argument("--chunk-size", type=int, default=0, help="aftune-chunked's chunk_size (0: its default)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (one process per tool per round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cap-gib", type=float, default=0.0, help="also find the largest batch under this RLIMIT_AS")
    ap.add_argument("--cap-limit", type=int, default=16, help="largest batch the cap search tries")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        if args.cap_gib:
            cap = int(args.cap_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(child(args)))
        return

    tools = args.tools.split(",")
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in lscpu.splitlines() if ":" in ln)}
    import torch

    print(
        f"host: {info.get('Model name')} ({info.get('CPU(s)')} CPUs, {info.get('Vendor ID')}); "
        f"torch {torch.__version__} threads={args.threads}; flags: {info.get('Flags')}"
    )
    print(
        f"model: Llama-shaped, hidden 640, {args.layers} layers, vocab {VOCAB}, tied; "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}; B={args.batch} question(s)/step, k={args.k}, "
        f"prompt {args.prompt_len}, responses {args.min_len}..{args.max_len} tokens",
        flush=True,
    )
    res: dict[str, list[dict]] = {t: [] for t in tools}
    for r in range(args.rounds):
        for t in tools:
            out, err = run_child(args, t, args.batch)
            if out is None:
                print(f"round {r} {t}: FAILED\n{err}", flush=True)
                continue
            res[t].append(out)
            print(f"round {r} {t}: {json.dumps(out)}", flush=True)

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    base = res.get("aftune-chunked") or []
    print(
        f"\n{'tool':<16}{'tokens fed':>11}{'step s':>9}{'alloc MiB':>11}{'rss MiB':>10}{'maxrss MiB':>12}"
        f"{'x time':>8}{'x alloc':>9}{'x rss':>8}  (medians of {args.rounds}; x = / aftune-chunked)"
    )
    for t in tools:
        if not res[t]:
            print(f"{t:<16}  failed")
            continue
        m = {k: med([o[k] for o in res[t]]) for k in ("s", "alloc_mb", "rss_mb", "maxrss_mb")}
        valid = all(o["maxrss_valid"] for o in res[t])
        ratio = {k: (m[k] / med([o[k] for o in base])) if base else float("nan") for k in ("s", "alloc_mb", "rss_mb")}
        print(
            f"{t:<16}{res[t][0]['tokens']:>11}{m['s']:>9.2f}{m['alloc_mb']:>11.0f}{m['rss_mb']:>10.0f}"
            f"{m['maxrss_mb']:>11.0f}{'' if valid else '*':<1}{ratio['s']:>8.2f}{ratio['alloc_mb']:>9.2f}"
            f"{ratio['rss_mb']:>8.2f}"
        )
    print("(* maxrss: the lifetime peak was set before the step, so that column is a lower bound there)")

    if args.cap_gib:
        print(f"\nlargest questions/step under RLIMIT_AS = {args.cap_gib:g} GiB (k={args.k}, one step):", flush=True)
        for t in tools:
            t0 = time.perf_counter()
            b, why = largest_batch(args, t, args.cap_gib, args.cap_limit)
            print(f"  {t:<16} B = {b}  ({why}; search {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
