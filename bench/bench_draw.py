"""Per-step cost of the sampler's draw: the exponential-race draw it had (a [rows, vocab] uniform tensor per step;
per-question seeds reseeding one generator per row) against the inverse-CDF draw on one hashed uniform per row
(aftune.sampling.sampler.pick). One process; each case repeated, medians reported (the host may be shared).

    python bench/bench_draw.py --vocab 32768 262144 --rows 128 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aftune.sampling.sampler import SamplingConfig, _mix, keyed, pick, row_key, shared_uniform

# ---- the previous draw, kept here as the baseline (it was aftune.sampling.sampler's until issue 26) ----


def old_shared_noise(gen):
    return lambda shape, device: torch.rand(shape, generator=gen, device=device, dtype=torch.float32)


def old_keyed_noise(keys, steps):
    def noise(shape, device):
        out = torch.empty(shape, device=device, dtype=torch.float32)
        gen = torch.Generator(device=device)
        for i, (key, t) in enumerate(zip(keys, steps)):
            gen.manual_seed(_mix(key, t))
            out[i].uniform_(generator=gen)
        return out

    return noise


def old_draw(probs, noise):
    u = noise(tuple(probs.shape), probs.device)
    e = u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_()
    return probs.div_(e).argmax(-1)


def old_pick(logits, cfg, noise):
    probs = torch.softmax(logits if cfg.temperature == 1 else logits / cfg.temperature, dim=-1)
    return old_draw(probs, noise)


# ---------------------------------------------------------------------------------------------------------


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, lazy init)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 262144])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SamplingConfig(temperature=0.8)
    gen = torch.Generator().manual_seed(0)
    keys_l = [row_key(_mix(0, q), j) for q in range(args.rows // 8 + 1) for j in range(8)][: args.rows]
    keys_t = torch.tensor(keys_l)
    steps_l = list(range(args.rows))
    steps_t = torch.tensor(steps_l)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows} rows, median of {args.repeats}")
    print("| vocab | seeds | old ms/step | new ms/step | old / new | softmax only ms |")
    print("|---|---|---|---|---|---|")
    for V in args.vocab:
        logits = torch.randn(args.rows, V, generator=torch.Generator().manual_seed(1)) * 3
        base = timed(lambda: torch.softmax(logits / cfg.temperature, -1), args.repeats)
        for name, old_noise, new_u in (
            ("shared", lambda: old_shared_noise(gen), lambda: shared_uniform(gen)),
            ("keyed", lambda: old_keyed_noise(keys_l, steps_l), lambda: keyed(keys_t, steps_t)),
        ):
            old = timed(lambda: old_pick(logits, cfg, old_noise()), args.repeats)
            new = timed(lambda: pick(logits, cfg, new_u()), args.repeats)
            print(f"| {V} | {name} | {old:.1f} | {new:.1f} | {old / new:.1f}x | {base:.1f} |", flush=True)


if __name__ == "__main__":
    main()
