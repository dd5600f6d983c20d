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

from aftune.sampling.sampler import SamplingConfig, _draw, _mix, keyed, pick, row_key, shared_uniform

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


def timed_pair(old, new, repeats: int) -> tuple[float, float]:
    """Median ms of old() and new(), interleaved call by call so a shared host's load falls on both alike."""
    old(), new()  # warm-up (allocator, lazy init)
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((old, a), (new, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


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
    print("draw: the token from the step's probabilities (the noise / uniforms included); step: softmax + draw")
    print("| vocab | seeds | old draw ms | new draw ms | old / new | old step ms | new step ms | old / new |")
    print("|---|---|---|---|---|---|---|---|")
    for V in args.vocab:
        logits = torch.randn(args.rows, V, generator=torch.Generator().manual_seed(1)) * 3
        probs = torch.softmax(logits / cfg.temperature, -1)
        work = probs.clone()  # the old draw overwrites its input: refilled from `probs` outside the timing
        for name, old_noise, new_u in (
            ("shared", lambda: old_shared_noise(gen), lambda: shared_uniform(gen)),
            ("keyed", lambda: old_keyed_noise(keys_l, steps_l), lambda: keyed(keys_t, steps_t)),
        ):

            def old_draw_only():
                work.copy_(probs)  # a memory pass the sampler does not make
                old_draw(work, old_noise())

            if name == "keyed":  # what float32 block sums would save (not exact: ~5e-7 relative per block)
                f64, f32 = timed_pair(
                    lambda: probs.view(args.rows, -1, 512).sum(-1, dtype=torch.float64),
                    lambda: probs.view(args.rows, -1, 512).sum(-1),
                    args.repeats,
                )
                print(f"  (vocab {V}: float64 block sums {f64:.1f} ms, float32 block sums {f32:.1f} ms)", flush=True)
            copy, _ = timed_pair(lambda: work.copy_(probs), lambda: None, args.repeats)
            od, nd = timed_pair(old_draw_only, lambda: _draw(probs, new_u()(args.rows, probs.device)), args.repeats)
            od -= copy
            os_, ns = timed_pair(
                lambda: old_pick(logits, cfg, old_noise()), lambda: pick(logits, cfg, new_u()), args.repeats
            )
            print(
                f"| {V} | {name} | {od:.1f} | {nd:.1f} | {od / nd:.1f}x | {os_:.1f} | {ns:.1f} | {os_ / ns:.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
