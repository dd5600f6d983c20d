"""Shared benchmark helpers: model builders, matmul ceiling, interleaved timing, peak memory.

The machine these run on may be shared: always time the two sides interleaved (A, B, A, B, ...)
and compare medians/ratios, not absolute numbers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch

# name -> (hidden, layers, heads, intermediate); vocab 2000, tied embeddings
MODELS = {
    "3.4m": (256, 4, 4, 600),
    "25m": (512, 8, 8, 1280),
}
VOCAB = 2000


def make_tokenizer(vocab: int = VOCAB):
    """Word-level tokenizer: word i <-> id i, one token per whitespace-separated word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i in range(vocab - len(words)):
        words[f"w{i}"] = len(words)
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_model(name: str, tokenizer, seed: int = 0):
    from aftune.modeling import build_tiny_model

    hidden, layers, heads, inter = MODELS[name]
    model = build_tiny_model(
        tokenizer,
        hidden_size=hidden,
        n_layers=layers,
        n_heads=heads,
        intermediate_size=inter,
        max_positions=2048,
        seed=seed,
    )
    model.config.use_cache = False
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_ceiling(dtype=torch.float32, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a large square torch.mm (best of reps): the practical ceiling for this dtype."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each fn `runs` times, alternating between them (A, B, A, B, ...) after `warmup` rounds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            times[k].append(timed(f))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(argv: list[str], timeout: float = 300) -> dict:
    """Run `python argv...` in a fresh process; it must print one JSON object as its last line."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def top_ops(fn: Callable[[], object], n: int = 12) -> str:
    """torch.profiler table (self CPU time) of one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


_mallinfo2 = None  # the libc function, looked up once (False: not available)


def heap_in_use() -> int | None:
    """Bytes the C heap has handed out and not taken back (glibc mallinfo2: uordblks + hblkhd, all arenas), or
    None without glibc >= 2.33. Torch's CPU allocator takes its tensors from this heap, so the figure is what is
    allocated at this instant, whatever the allocator caches or other processes do."""
    global _mallinfo2
    if _mallinfo2 is None:
        try:
            _mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
        except (OSError, AttributeError, TypeError):
            _mallinfo2 = False
            return None
        _mallinfo2.restype = _MallInfo2
    if _mallinfo2 is False:
        return None
    m = _mallinfo2()
    return m.uordblks + m.hblkhd


def heap_peak_mb(fn: Callable[[], object], interval_s: float = 0.0005) -> float:
    """Peak of heap_in_use() above its level before fn, polled from a thread every interval_s while fn runs (MiB).

    For long calls (a whole sampling run) where the profiler's event log would itself outgrow memory: it keeps
    one number, not one event per allocation. Torch releases the GIL inside its kernels, which is when the big
    tensors are alive, so the poller runs then; the switch interval is shortened meanwhile so it also gets turns
    between Python-level ops. A sampled peak can only miss allocations that live less than a poll interval."""
    base = heap_in_use()
    if base is None:
        raise RuntimeError("heap_peak_mb needs glibc's mallinfo2 (glibc >= 2.33)")
    peak = [base]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], heap_in_use())
            time.sleep(interval_s)

    old = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
        sys.setswitchinterval(old)
    peak[0] = max(peak[0], heap_in_use())
    return (peak[0] - base) / 2**20
