"""Benchmark: training step time (score_groups + backward + AdamW) vs k, prompt computed once or not.

With the prompt computed once (share_prefix=True) the step grows with k x response length; the naive
path (share_prefix=False, every prompt + candidate run separately) grows with k x (prompt + response).
Reports the least-squares slope (seconds per added candidate) of each and their ratio, to compare with
(P + R) / R. Timings interleaved (shared, naive, shared, ...), medians of --runs.

    python bench/bench_step_vs_k.py                     # 3.4M Llama, k = 1, 2, 4, 8
    python bench/bench_step_vs_k.py --model 25m --ks 2,8
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, interleaved, make_tokenizer, median  # noqa: E402

from aftune.scoring import score_groups  # noqa: E402


def slope(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="3.4m")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=96)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = make_tokenizer()
    model = build_model(args.model, tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(3, len(tok), (n,), generator=g).tolist()
    ks = [int(x) for x in args.ks.split(",")]
    P, R, B = args.prompt_len, args.response_len, args.questions
    med = {"shared": [], "naive": []}
    for k in ks:
        prompts = [rnd(P) for _ in range(B)]
        cands = [[rnd(R) for _ in range(k)] for _ in range(B)]

        def step(share):
            def f():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    s = score_groups(model, prompts, cands, tok.pad_token_id, share_prefix=share)
                s.mean.sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return f

        t = interleaved({"shared": step(True), "naive": step(False)}, args.runs)
        for side in med:
            med[side].append(median(t[side]))
        print(
            f"k={k}: shared {med['shared'][-1] * 1e3:.0f} ms ({B * (P + k * R)} tok), naive "
            f"{med['naive'][-1] * 1e3:.0f} ms ({B * k * (P + R)} tok), naive/shared "
            f"{med['naive'][-1] / med['shared'][-1]:.2f}x",
            flush=True,
        )
    ss, sn = slope(ks, med["shared"]), slope(ks, med["naive"])
    print(
        f"SUMMARY bench_step_vs_k {args.model} P={P} R={R} B={B} threads={args.threads}"
        f"{' bf16' if args.bf16 else ''}: seconds per added candidate shared {ss:.3f}, naive {sn:.3f}, "
        f"ratio {sn / ss:.2f} (token model (P+R)/R = {(P + R) / R:.2f}); step(k={ks[-1]})/step(k={ks[0]}) "
        f"shared {med['shared'][-1] / med['shared'][0]:.2f}x, naive {med['naive'][-1] / med['naive'][0]:.2f}x; "
        f"naive/shared at k={ks[-1]} {med['naive'][-1] / med['shared'][-1]:.2f}x"
    )


if __name__ == "__main__":
    main()
