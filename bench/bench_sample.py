"""Benchmark: aftune's generate_k (one prefill, cache expanded to k rows) vs HF generate(num_return_sequences=k).

Both sides sample the same prompts, batched the same way, with EOS suppressed so every row generates
exactly --max-new-tokens tokens; timings are interleaved and the median of --runs is reported. Peak memory
of each side is measured in a fresh child process (sampled RSS growth over the loaded-model baseline; on CUDA
torch.cuda.max_memory_allocated). A second part measures dropping finished rows from the cache, with EOS
made likely so that rows end at different steps.

    python bench/bench_sample.py                # ~3M-parameter random Llama, k=8, 64-token prompts
    python bench/bench_sample.py --model PATH   # any local causal LM
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import torch

from aftune.sampling import SamplingConfig, generate_k


def build(args):
    if args.model:
        from aftune.modeling import load_model, load_tokenizer

        return load_model(args.model), load_tokenizer(args.model)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from aftune.modeling import build_tiny_model

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i in range(args.vocab - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    model = build_tiny_model(
        tok,
        hidden_size=args.hidden,
        n_layers=args.layers,
        n_heads=args.heads,
        intermediate_size=2 * args.hidden,
        max_positions=1024,
        seed=0,
    )
    return model, tok


def eos_ids(model, tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    g = model.generation_config.eos_token_id
    ids.update([g] if isinstance(g, int) else (g or []))
    return sorted(ids)


def add_eos_bias(model, tok, bias: float):
    """Add `bias` to the EOS logits on both sides (-inf: never stop, so both make the same tokens)."""
    ids = eos_ids(model, tok)

    def hook(_m, _i, out):
        out = out.clone()
        out[..., ids] += bias
        return out

    return model.get_output_embeddings().register_forward_hook(hook)


def make_prompts(tok, n: int, length: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    pool = torch.tensor([i for i in range(len(tok)) if i not in special])
    prompts = []
    for _ in range(n):
        ids = pool[torch.randint(len(pool), (length,), generator=g)].tolist()
        prompts.append(tok.decode(ids, skip_special_tokens=True))
    return prompts


def run_aftune(model, tok, prompts, cfg, **kw) -> int:
    res = generate_k(model, tok, prompts, cfg, **kw)
    return sum(s.n_tokens for r in res for s in r)


def run_generate(model, tok, prompts, cfg) -> int:
    # Same batching as generate_k (sorted by length, batch_size questions per call), left padding.
    enc = tok(prompts)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]), reverse=True)
    n_new = 0
    tok.padding_side = "left"
    with torch.inference_mode():
        for s in range(0, len(order), cfg.batch_size):
            batch = [prompts[i] for i in order[s : s + cfg.batch_size]]
            inp = tok(batch, return_tensors="pt", padding=True).to(model.device)
            out = model.generate(
                **inp,
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=0,  # generate's global default is top-k 50; aftune samples from the whole distribution
                num_return_sequences=cfg.k,
                max_new_tokens=cfg.max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
            n_new += (out.shape[1] - inp["input_ids"].shape[1]) * out.shape[0]
    return n_new


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(args) -> None:
    """One run of one side in a fresh process; prints its peak memory growth as JSON."""
    torch.set_num_threads(args.threads)
    model, tok = build(args)
    model.eval()
    add_eos_bias(model, tok, float("-inf"))
    prompts = make_prompts(tok, args.n_prompts, args.prompt_len, args.seed)
    cfg = SamplingConfig(
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # ru_maxrss alone is useless here: importing and building the model peaks above the run itself.
    # So a thread samples VmRSS every millisecond during the run; the peak minus the pre-run RSS is the
    # memory the sampling itself needed.
    base, peak, running = rss_kb(), [0], [True]

    def poll() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_kb())
            time.sleep(0.001)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    (run_aftune if args._child == "aftune" else run_generate)(model, tok, prompts, cfg)
    running[0] = False
    th.join()
    res = {"peak_rss_growth_mb": round((max(peak[0], rss_kb()) - base) / 1024, 1)}
    if cuda:
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


def timed(fn) -> tuple[float, float, int]:
    """(wall s, process CPU s, result). CPU time is reported too: on a shared machine other jobs
    inflate wall time but not (much) the CPU time this process itself spends."""
    t, c = time.perf_counter(), time.process_time()
    n = fn()
    return time.perf_counter() - t, time.process_time() - c, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="local model folder (default: random ~3M Llama)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16, help="questions per batch (both sides)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurement")
    ap.add_argument("--no-compaction", action="store_true", help="skip the finished-row dropping measurement")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return child(args)

    torch.set_num_threads(args.threads)
    model, tok = build(args)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompts = make_prompts(tok, args.n_prompts, args.prompt_len, args.seed)
    plens = [len(x) for x in tok(prompts)["input_ids"]]
    cfg = SamplingConfig(
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    expected = len(prompts) * args.k * args.max_new_tokens
    print(
        f"model: {n_params / 1e6:.2f}M params, {len(prompts)} prompts of {min(plens)}-{max(plens)} tokens, "
        f"k={args.k}, max_new_tokens={args.max_new_tokens}, batch={args.batch_size} questions, "
        f"threads={args.threads}, device={next(model.parameters()).device}"
    )

    handle = add_eos_bias(model, tok, float("-inf"))  # EOS suppressed on both sides: equal token counts
    small = [prompts[0]]
    run_aftune(model, tok, small, SamplingConfig(k=2, max_new_tokens=4))  # warm-up (allocator, lazy init)
    run_generate(model, tok, small, SamplingConfig(k=2, max_new_tokens=4))
    t_a, t_g, c_a, c_g = [], [], [], []
    for r in range(args.runs):
        sides = [
            ("a", lambda: run_aftune(model, tok, prompts, cfg)),
            ("g", lambda: run_generate(model, tok, prompts, cfg)),
        ]
        for name, fn in sides if r % 2 == 0 else sides[::-1]:  # interleaved, alternating order
            dt, dc, n = timed(fn)
            assert n == expected, f"{name}: {n} new tokens, expected {expected}"
            (t_a if name == "a" else t_g).append(dt)
            (c_a if name == "a" else c_g).append(dc)
    handle.remove()
    ma, mg = statistics.median(t_a), statistics.median(t_g)
    x, y = expected / ma, expected / mg
    print(f"wall s per run: aftune {[round(t, 2) for t in t_a]}  generate {[round(t, 2) for t in t_g]}")
    ca, cg = statistics.median(c_a), statistics.median(c_g)
    print(
        f"CPU s per run:  aftune {[round(t, 2) for t in c_a]}  generate {[round(t, 2) for t in c_g]}  "
        f"(median CPU-time ratio {cg / ca:.2f})"
    )

    if not args.no_memory:
        base = [sys.executable, __file__] + [a for a in sys.argv[1:]]
        for side in ("aftune", "generate"):
            out = subprocess.run(base + ["--_child", side], capture_output=True, text=True, check=True)
            print(f"peak memory {side}: {out.stdout.strip().splitlines()[-1]}")

    if not args.no_compaction:
        # EOS made likely (about half the rows end within ~1/3 of the budget): does dropping finished
        # rows from the cache pay for its index_select copies?
        handle = add_eos_bias(model, tok, 4.0)
        ccfg = SamplingConfig(
            k=args.k, max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=args.batch_size, seed=args.seed
        )
        res = {}
        for name, at in (("drop at 50%", 0.5), ("drop at 25%", 0.25), ("never drop", 2.0)):
            times, st = [], {}
            for _ in range(args.runs):
                st = {}
                dt, dc, n = timed(lambda: run_aftune(model, tok, prompts, ccfg, compact_at=at, stats=st))
                times.append(dc)
            res[name] = (statistics.median(times), n, st)
        handle.remove()
        for name, (t, n, st) in res.items():
            print(
                f"finished rows, {name}: {t:.2f} CPU s median, {n} tokens ({t / n * 1e3:.2f} CPU ms/token), "
                f"{st['row_steps']} row-steps computed, {st['compactions']} compactions"
            )

    print(
        f"sample: aftune {x:.0f} tok/s, generate {y:.0f} tok/s, ratio {x / y:.2f}  "
        f"(wall-clock medians; {expected} new tokens per run)"
    )


if __name__ == "__main__":
    main()
