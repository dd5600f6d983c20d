"""k sampled completions per question, the prompt prefilled once and its KV cache shared by k rows.

`model.generate(num_return_sequences=k)` copies every prompt k times *before* prefill, so it runs the
prompt through the model k times. Here each batch of prompts is prefilled once, then the cache (and the
last-position logits) are expanded to k rows per question with `repeat_interleave` on the batch dim,
and a plain decode loop runs on the model's own forward (any HF causal LM with a `Cache`).

Continuous batching: when there are more prompts than one batch, rows that finish (EOS, stop string,
max_new_tokens) free their slots and waiting prompts are prefilled and admitted into the running batch
(`_generate_continuous`), so one long answer does not keep a whole batch's worth of slots half empty.
The running rows then sit at different positions: each new prompt's keys are written right-aligned to
the current cache length, with the columns before it masked out, and its position ids continue its own
prompt. Leading columns no running row needs any more are trimmed at each refill.

Scores: every sampled token's log-probability is taken from the model's *untempered* distribution
(raw logit minus the logsumexp of the raw logits), so `Sample.score` is the AFT score s(c) of the spec
regardless of the sampling temperature.

Seeds: with `seeds` (one per prompt; `aftune sample` keys them by question id) every row's step t draws with
one uniform hashed from (prompt seed, row j, t) (`keyed_uniform`), so a question's k samples do not depend
on which questions share its batch: a resumed, sharded or continuously batched run gives the same candidates as
a straight one, and the vLLM engine (vllm_backend) draws the very same tokens. Without `seeds`, one generator
seeded by cfg.seed gives the step's uniforms (the draws then depend on the batch schedule).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from aftune.modeling import cache_kwarg, forward_params, returned_cache
from aftune.prompting import encode_prompt
from aftune.sampling.calculator import Calculator
from aftune.scoring import pad_sequences


@dataclass
class SamplingConfig:
    k: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 = greedy (k identical rows; use k=1)
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    batch_size: int = 16  # questions per batch (k rows each)
    calculator: bool = False  # fill in `<<expr=` annotations (aftune.sampling.calculator; Task.calculator)

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)  # lists from YAML/JSON become tuples so configs compare equal
        if self.k < 1:
            raise ValueError(f"SamplingConfig.k must be >= 1, got {self.k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"SamplingConfig.batch_size must be >= 1, got {self.batch_size}")
        if any(not s for s in self.stop):
            raise ValueError("SamplingConfig.stop must not contain an empty string")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class Sample:
    text: str  # decoded response; EOS excluded, cut before the first stop string
    token_ids: list[int] = field(default_factory=list)  # generated ids, incl. EOS / the stop string's tokens
    logprob_sum: float = 0.0  # sum of untempered log-probs of token_ids
    n_tokens: int = 0
    token_logprobs: list[float] = field(default_factory=list)  # per token of token_ids (generate_k fills it)

    @property
    def score(self) -> float:
        """Length-normalised log-likelihood (AFT's s(c))."""
        return self.logprob_sum / max(self.n_tokens, 1)


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in a buffer sized for the whole generation.

    DynamicLayer.update concatenates, copying the whole cache every step; on CPU at 128 rows x 160
    positions that copy costs about as much as the attention itself. Here a step writes one slot and
    the model reads a view (SDPA takes the strided view at the speed of a contiguous tensor).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: int, capacity: int):
        super().__init__()
        b, n = keys.shape[0], keys.shape[-2]
        self.device = keys.device
        self._k = keys.new_empty((b * repeats, keys.shape[1], capacity, keys.shape[3]))
        self._v = values.new_empty((b * repeats, values.shape[1], capacity, values.shape[3]))
        # Broadcast each question's prompt into its k rows directly (no repeat_interleave temporary).
        self._k.view(b, repeats, *self._k.shape[1:])[:, :, :, :n] = keys.unsqueeze(1)
        self._v.view(b, repeats, *self._v.shape[1:])[:, :, :, :n] = values.unsqueeze(1)
        self._n = n
        self.is_initialized = True
        self._sync()

    def _sync(self) -> None:
        self.keys = self._k[:, :, : self._n]
        self.values = self._v[:, :, : self._n]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = key_states.shape[-2]
        if self._n + m > self._k.shape[-2]:  # outgrew the estimate: double, like a list
            cap = max(2 * self._k.shape[-2], self._n + m)
            grow = lambda t: torch.cat([t, t.new_empty((*t.shape[:2], cap - t.shape[2], t.shape[3]))], 2)  # noqa: E731
            self._k, self._v = grow(self._k), grow(self._v)
        self._k[:, :, self._n : self._n + m] = key_states
        self._v[:, :, self._n : self._n + m] = value_states
        self._n += m
        self._sync()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = indices.to(self._k.device)  # device_map="auto": layers live on different devices
        self._k, self._v = self._k[indices], self._v[indices]
        self._sync()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self._sync()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self._n = max(self._n + tokens_to_remove, 0)
        self._sync()


def _refill_layer(
    layer: _PreallocatedLayer, keep: torch.Tensor, new, trim: int, width: int, repeats: int, capacity: int
) -> None:
    """Rebuild one layer's buffer as [kept rows; new prompts x repeats], `width` columns in use: the kept rows'
    columns from `trim` on, right-aligned; each new prompt's keys right-aligned too (left of them: unused)."""
    old_n = layer._n - trim
    nk, nv = new  # [b, heads, L, dim] prompt keys / values of the new questions
    rows = len(keep) + nk.shape[0] * repeats
    src = layer._k if len(keep) else nk
    k_buf = src.new_zeros((rows, src.shape[1], capacity, src.shape[3]))
    v_buf = src.new_zeros((rows, src.shape[1], capacity, src.shape[3]))
    if len(keep):
        keep = keep.to(layer._k.device)
        k_buf[: len(keep), :, width - old_n : width] = layer._k[keep, :, trim : layer._n]
        v_buf[: len(keep), :, width - old_n : width] = layer._v[keep, :, trim : layer._n]
    b, n = nk.shape[0], nk.shape[-2]
    k_buf[len(keep) :].view(b, repeats, *k_buf.shape[1:])[:, :, :, width - n : width] = nk.unsqueeze(1)
    v_buf[len(keep) :].view(b, repeats, *v_buf.shape[1:])[:, :, :, width - n : width] = nv.unsqueeze(1)
    layer._k, layer._v, layer._n = k_buf, v_buf, width
    layer._sync()


def _plain_layers(cache, span: int) -> bool:
    """Can every layer of this prefill cache become a _PreallocatedLayer for rows of at most `span` tokens?

    Plain DynamicLayers can. So can sliding-window layers whose window cannot bind: HF shows a key iff
    q - k < window, and within one row q - k <= span - 1, so with span < window the layer still holds every
    column and acts as a full layer (Gemma 3: window 512 against GSM8K prompts of at most 166 tokens + T)."""
    layers = getattr(cache, "layers", None)
    if not (isinstance(cache, DynamicCache) and not getattr(cache, "offloading", False) and layers):
        return False
    for layer in layers:
        if not layer.is_initialized:
            return False
        if type(layer) is DynamicSlidingWindowLayer:
            if not (span < layer.sliding_window and layer.keys.shape[-2] == layer.cumulative_length):
                return False
        elif type(layer) is not DynamicLayer:
            return False
    return True


def _expand_cache(cache, k: int, capacity: int, preallocate: bool) -> None:
    """Give each question k rows of its prompt cache, in a preallocated buffer where the layer types allow
    (capacity = the longest row: prompt + max_new_tokens)."""
    if preallocate and _plain_layers(cache, capacity):
        cache.layers = [_PreallocatedLayer(layer.keys, layer.values, k, capacity) for layer in cache.layers]
    elif k > 1:  # sliding-window, hybrid or custom caches: the model's own generic expansion
        cache.batch_repeat_interleave(k)


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for src in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return sorted(ids)


_MASK64 = (1 << 64) - 1


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser, chained): well spread even for neighbouring inputs,
    so the rows j and j + 1 of one question and the steps t and t + 1 of one row get unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 29
    return x >> 1


def question_seed(seed: int, question_id: str) -> int:
    """The seed of one question's k rows: a function of (run seed, question id) only."""
    return _mix(seed, zlib.crc32(str(question_id).encode()), len(str(question_id)))


def row_key(prompt_seed: int, j: int) -> int:
    """The key of row j of a prompt (its step t's uniform is keyed_uniform(row_key, t))."""
    return _mix(prompt_seed, j)


# A draw takes one uniform per row: `Uniform(n, device)` -> [n] float64 in [0, 1).
Uniform = Callable[[int, torch.device], torch.Tensor]

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for int64 x in [0, 2^32): c in 16-bit halves, so no product reaches 2^63 (int64 overflow
    is undefined in C++, so CPU and CUDA need not wrap alike)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche bijection (xorshift-multiply rounds) on int64 tensors holding values < 2^32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def keyed_uniform(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[n] float64 uniforms in [0, 1), element i a function of (keys[i], steps[i]) alone: a counter-based hash in
    integer tensor ops (no generator, no per-row loop), bit-identical on every device.

    Two 32-bit lanes absorb the 63-bit key in different orders (so two keys share both lanes' states with
    probability 2^-64, not 2^-32), then the step; the high word also mixes in the low one, and together they give
    53 bits."""
    keys, steps = keys.long(), steps.long()
    lo, hi, t = keys & _M32, (keys >> 32) & _M32, steps & _M32
    a = _fmix32(_fmix32(_fmix32(lo ^ 0x9E3779B9) ^ hi) ^ t)
    b = _fmix32(_fmix32(_fmix32(hi ^ 0x85EBCA6B) ^ lo) ^ t)
    a = _fmix32(a ^ _fmix32(b ^ 0xC2B2AE35))
    return ((a >> 6) * (1 << 27) + (b >> 5)).to(torch.float64) * 2.0**-53


def shared_uniform(gen: torch.Generator) -> Uniform:
    """A step's uniforms from one generator (the draws then depend on the batch's row order)."""
    return lambda n, device: torch.rand(n, generator=gen, device=device, dtype=torch.float64)


def keyed(keys: torch.Tensor, steps: torch.Tensor) -> Uniform:
    """The uniforms of rows with these keys at these steps (keyed_uniform; computed only where a draw is made)."""
    return lambda n, device: keyed_uniform(keys.to(device), steps.to(device))


DRAW_BLOCK = 512  # vocabulary block of the two-level inverse CDF


def _last_positive(p: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last entry > 0 (-1 if none)."""
    idx = torch.arange(p.shape[-1], device=p.device)
    return torch.where(p > 0, idx, -1).amax(-1)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row with probability proportional to `probs` (>= 0; rows need not sum to 1, each needs some
    mass), by inverse CDF on the row's uniform u ([rows] float64 in [0, 1)).

    Token i owns [C_{i-1}, C_i) of the cumulative sum and u * C_V picks one (searchsorted, right side), so a
    token of probability 0 owns an empty interval and is never chosen; where rounding puts the point at or past a
    total, it goes to the last token with mass, never to a zero. Two levels keep it cheap at a 262k vocabulary:
    block sums pick a block, and only that block of each row is cumulated, in float64 (no [rows, vocab] float64
    temporary). The block sums are float32 (torch sums float32 into float64 25x slower on CPU, and that was the
    whole draw's time): a block's mass is then off by about 1e-6 relative at most, which moves at most that much
    probability to the last token with mass in the block; every other step is float64.
    """
    rows, V = probs.shape
    bs = min(DRAW_BLOCK, V)
    n_full = V // bs
    sums = probs[:, : n_full * bs].view(rows, n_full, bs).sum(-1, dtype=torch.float32).double()
    if n_full * bs < V:
        sums = torch.cat([sums, probs[:, n_full * bs :].sum(-1, dtype=torch.float32, keepdim=True).double()], -1)
    cum = sums.cumsum(-1)
    x = u.to(cum.device, torch.float64) * cum[:, -1]
    blk = torch.searchsorted(cum, x.unsqueeze(-1), right=True).squeeze(-1)
    blk = torch.minimum(blk, _last_positive(sums))
    before = cum.gather(-1, (blk - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    r = x - torch.where(blk > 0, before, 0.0)  # >= 0: cum[blk - 1] <= x
    cols = blk.unsqueeze(-1) * bs + torch.arange(bs, device=probs.device)
    p = probs.gather(-1, cols.clamp(max=V - 1)).double().masked_fill(cols >= V, 0.0)
    j = torch.searchsorted(p.cumsum(-1), r.unsqueeze(-1), right=True).squeeze(-1)
    return blk * bs + torch.minimum(j, _last_positive(p))


def pick(logits: torch.Tensor, cfg: SamplingConfig, uniform: Uniform) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else temperature + nucleus sampling, one uniform per row."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits if cfg.temperature == 1 else logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p = probs.sort(dim=-1, descending=True).values
        # the smallest prefix whose mass reaches top_p (a token is dropped once the mass before it does); then
        # every token as probable as the last kept one stays too, so ties never depend on the sort's order
        n_keep = ((sorted_p.cumsum(-1) - sorted_p) < cfg.top_p).sum(-1, keepdim=True)
        probs = probs.masked_fill(probs < sorted_p.gather(-1, n_keep - 1), 0.0)
    return _draw(probs, uniform(probs.shape[0], probs.device))


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(text up to the first stop string, whether one was found): how every sampled completion is cut (the
    sampler, the vLLM backend, greedy eval, GRPO's rewards)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


STOP_MARGIN = 4  # tail tokens decoded beyond the longest stop string's length in characters


class StopCheck:
    """Which rows' text now contains a stop string, decoding only each row's last tokens.

    Checked every step, a stop string first appears in the text ending with the newest token, so only the tail
    is decoded: a stop of c characters lies within the last c tokens that produce text (the margin covers tokens
    that decode to nothing or to part of a character). The tails of all rows come over in one transfer, not one
    device-to-host sync per row.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.window = max(len(x) for x in self.stop) + STOP_MARGIN

    def __call__(self, tokens: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """tokens: [rows, T] by global row; rows / ends: the rows to check and how many tokens each has."""
        cols = ends.unsqueeze(1) - self.window + torch.arange(self.window, device=ends.device)
        tails = tokens[rows.unsqueeze(1), cols.clamp(min=0)].masked_fill(cols < 0, -1)
        hit = [
            cut_at_stop(self.tokenizer.decode([t for t in tail if t >= 0], skip_special_tokens=True), self.stop)[1]
            for tail in tails.tolist()
        ]
        return torch.tensor(hit, dtype=torch.bool, device=rows.device)


def _advance(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    uniform: Uniform,
    live: torch.Tensor,
    alive: torch.Tensor,
    at: torch.Tensor,
    tokens: torch.Tensor,
    lps: torch.Tensor,
    eos_t: torch.Tensor,
    calc: Calculator | None,
    stops: StopCheck | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's work shared by both decode loops: draw, log-prob, calculator, EOS and stop checks.

    alive: each cache row's global row; at: its token count before this step; tokens / lps: [rows, T] buffers
    by global row, written at (alive, at) for live rows. Returns (the step's token per cache row, finished)."""
    lse = torch.logsumexp(logits, dim=-1)  # log-probs as logit - lse: no [rows, vocab] log_softmax kept
    tok = pick(logits, cfg, uniform)
    if calc is not None:
        tok = calc.override(tok, alive, live)
    rows, pos = alive[live], at[live]
    tokens[rows, pos] = tok[live]
    lps[rows, pos] = (logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - lse)[live]
    ends = at + 1
    if calc is not None:
        calc.observe(tok, alive, live, tokens, ends)
    finished = live & torch.isin(tok, eos_t) if len(eos_t) else torch.zeros_like(live)
    if stops is not None:
        j = torch.nonzero(live & ~finished).flatten()
        if len(j):
            finished[j[stops(tokens, alive[j], ends[j])]] = True
    return tok, finished


def _uniform_for(
    gen: torch.Generator, row_keys: torch.Tensor | None, alive: torch.Tensor, at: torch.Tensor
) -> Uniform:
    """The step's uniforms: keyed by (row, step) with per-prompt seeds, else the call's one generator."""
    return shared_uniform(gen) if row_keys is None else keyed(row_keys[alive], at)


def _devices(model) -> tuple[torch.device, torch.device]:
    """(where inputs go, where logits come out): with device_map="auto" the embedding and the LM head may sit
    on different devices, neither of which need be the first parameter's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    in_dev = weight.device if weight is not None else next(model.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return in_dev, (weight.device if weight is not None else in_dev)


def _select_rows(cache, keep: torch.Tensor) -> None:
    """cache.batch_select_indices with the index on each layer's own device (device_map="auto")."""
    layers = getattr(cache, "layers", None)
    if not layers:
        cache.batch_select_indices(keep)
        return
    for layer in layers:
        dev = layer._k.device if isinstance(layer, _PreallocatedLayer) else getattr(layer.keys, "device", None)
        layer.batch_select_indices(keep.to(dev) if dev is not None else keep)


def _generate_batch(
    model,
    prompt_ids: list[list[int]],
    cfg: SamplingConfig,
    eos: list[int],
    pad_id: int,
    gen: torch.Generator,
    tokenizer,
    compact_at: float,
    stats: dict[str, int],
    preallocate_cache: bool,
    calc: Calculator | None = None,
    row_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch, k rows per prompt -> (tokens [B*k, T], log-probs [B*k, T], lengths [B*k]) by row q * k + j."""
    in_dev, _ = _devices(model)
    B, k, T = len(prompt_ids), cfg.k, cfg.max_new_tokens
    lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    L = int(lens.max())
    ids, mask = pad_sequences(prompt_ids, pad_id, left=True)  # every row's last prompt token at position L-1
    padded = bool((lens < L).any())
    ids, mask = ids.to(in_dev), mask.to(in_dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    cache_kw = cache_kwarg(model)
    fwd_params = forward_params(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in fwd_params else {}
    # Without padding the default causal mask is exact, and skipping the 2-D mask saves building a
    # 4-D one every step.
    out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=pos, use_cache=True, **extra)
    cache = returned_cache(out)
    if cache is None:
        raise TypeError(f"{type(model).__name__} returned no KV cache; generate_k needs a model with use_cache")
    logits = out.logits[:, -1, :].float()
    del out
    device = logits.device  # the row bookkeeping lives where the logits are

    # One prefill, then k decode rows per question: the prompt's keys/values are copied, never recomputed.
    _expand_cache(cache, k, L + T, preallocate_cache)
    if k > 1:
        logits = logits.repeat_interleave(k, dim=0)
        mask = mask.repeat_interleave(k, dim=0)
    R = B * k
    next_pos = lens.to(device).repeat_interleave(k)  # position of each row's next token
    alive = torch.arange(R, device=device)  # cache row -> global row
    done = torch.zeros(R, dtype=torch.bool, device=device)
    length = torch.full((R,), T, dtype=torch.long, device=device)
    tokens = torch.full((R, T), pad_id, dtype=torch.long, device=device)
    lps = torch.zeros((R, T), dtype=torch.float32, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    stops = StopCheck(tokenizer, cfg.stop) if cfg.stop else None
    for t in range(T):
        live = ~done[alive]
        at = torch.full_like(alive, t)
        uniform = _uniform_for(gen, row_keys, alive, at)
        tok, finished = _advance(logits, cfg, uniform, live, alive, at, tokens, lps, eos_t, calc, stops)
        newly = alive[finished]
        done[newly] = True
        length[newly] = t + 1
        if t == T - 1 or bool(done.all()):
            break
        still = live & ~finished
        n_dead = len(alive) - int(still.sum())
        if n_dead and n_dead >= compact_at * len(alive):
            # Finished rows would still cost a forward each step; drop them from the cache.
            keep = torch.nonzero(still).flatten()
            _select_rows(cache, keep)
            alive, tok, next_pos = alive[keep], tok[keep], next_pos[keep]
            mask = mask[keep.to(mask.device)]
            stats["compactions"] += 1
        if padded:
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=-1)
        logits, cache = _decode_step(model, tok, mask if padded else None, next_pos, cache, cache_kw, extra)
        next_pos = next_pos + 1
        stats["row_steps"] += len(alive)
    return tokens, lps, length


# Continuous batching admits waiting questions once this fraction of the batch's rows (and at least one
# question's k) has finished: each refill costs a prefill call and a copy of the cache, so not one per row.
REFILL_AT = 0.25


def _prefill(model, prompt_ids: list[list[int]], pad_id: int, extra: dict, span: int):
    """One left-padded prefill of new questions -> (per-layer (keys, values), last-position logits, mask), or
    None where the cache layers cannot be refilled for rows of up to `span` tokens (_plain_layers)."""
    in_dev, _ = _devices(model)
    ids, mask = pad_sequences(prompt_ids, pad_id, left=True)
    ids, mask = ids.to(in_dev), mask.to(in_dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
    cache = returned_cache(out)
    if cache is None:
        raise TypeError(f"{type(model).__name__} returned no KV cache; generate_k needs a model with use_cache")
    if not _plain_layers(cache, span):
        return None  # binding sliding windows, hybrid or custom cache layers: no continuous batching
    return [(layer.keys, layer.values) for layer in cache.layers], out.logits[:, -1, :].float(), mask


def _generate_continuous(
    model,
    enc: list[list[int]],
    order: list[int],
    cfg: SamplingConfig,
    eos: list[int],
    pad_id: int,
    gen: torch.Generator,
    tokenizer,
    compact_at: float,
    stats: dict[str, int],
    calc: Calculator | None = None,
    row_keys: torch.Tensor | None = None,
    emit: Callable[[list[int], torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """All prompts through one running batch of cfg.batch_size * k rows, admitted in `order` as rows free up.
    Returns (tokens, log-probs, lengths) by global row q * k + j, or None (before sampling anything) where the
    model's cache layers cannot be refilled. `emit(questions, tokens, lps, length)` is called as questions
    finish (all k rows done)."""
    in_dev, _ = _devices(model)
    k, T, n_q = cfg.k, cfg.max_new_tokens, len(enc)
    max_rows = cfg.batch_size * k
    span = max(len(e) for e in enc) + T
    threshold = max(k, REFILL_AT * max_rows)
    cache_kw = cache_kwarg(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}
    waiting = list(order)
    cache = DynamicCache()
    state: dict[str, Any] = {}
    stops = StopCheck(tokenizer, cfg.stop) if cfg.stop else None

    def admit() -> bool:
        """Drop finished rows and add the next waiting questions (k rows each): one cache rebuild."""
        nonlocal waiting
        n_new = min(len(waiting), (max_rows - (int((~state["fin"]).sum()) if state else 0)) // k)
        batch, new_waiting = waiting[:n_new], waiting[n_new:]
        # a row never sees keys of another: its span is at most its prompt + T, wherever it sits in the cache
        got = _prefill(model, [enc[i] for i in batch], pad_id, extra, span)
        if got is None:
            return False
        waiting = new_waiting
        layer_kv, new_logits, new_mask = got
        if not state:  # the buffers live where the logits come out (device_map="auto": the last device)
            device = new_logits.device
            empty = torch.zeros(0, dtype=torch.long, device=device)
            state.update(
                tokens=torch.full((n_q * k, T), pad_id, dtype=torch.long, device=device),  # by global row q*k+j
                lps=torch.zeros((n_q * k, T), dtype=torch.float32, device=device),
                length=torch.zeros(n_q * k, dtype=torch.long, device=device),
                left=torch.full((n_q,), k, dtype=torch.long, device=device),  # rows still running per question
                eos=torch.tensor(eos, dtype=torch.long, device=device),
                alive=empty,  # per cache row: global row, tokens so far, next position
                step=empty,
                next_pos=empty,
                fin=torch.zeros(0, dtype=torch.bool, device=device),  # finished, still in the cache
                mask=torch.zeros((0, 0), dtype=torch.long, device=in_dev),
                logits=torch.zeros((0, 0), device=device),
            )
        st = state
        device = st["alive"].device
        stats["refills"] = stats.get("refills", 0) + 1
        keep = torch.nonzero(~st["fin"]).flatten()
        n_keep = len(keep)
        kmask = st["mask"][keep.to(in_dev)]
        # columns left of every kept row's first real one are needed by no row: trimmed
        trim = int(kmask.argmax(-1).min()) if n_keep else kmask.shape[1]
        old_n = kmask.shape[1] - trim
        width = max(old_n, new_mask.shape[1])
        if not cache.layers:
            cache.layers = [_PreallocatedLayer(kk[:0, :, :0], vv[:0, :, :0], 1, 0) for kk, vv in layer_kv]
        for layer, kv in zip(cache.layers, layer_kv):
            _refill_layer(layer, keep, kv, trim, width, k, width + T)
        m = kmask.new_zeros((n_keep + n_new * k, width))
        m[:n_keep, width - old_n :] = kmask[:, trim:]
        m[n_keep:, width - new_mask.shape[1] :] = new_mask.repeat_interleave(k, dim=0)
        st["mask"], st["padded"] = m, not bool(m.all())
        new_rows = (torch.tensor(batch, device=device).unsqueeze(1) * k + torch.arange(k, device=device)).flatten()
        st["alive"] = torch.cat([st["alive"][keep], new_rows])
        st["step"] = torch.cat([st["step"][keep], st["step"].new_zeros(len(new_rows))])
        st["next_pos"] = torch.cat([st["next_pos"][keep], new_mask.sum(-1).to(device).repeat_interleave(k)])
        new_logits = new_logits.to(device).repeat_interleave(k, dim=0)
        st["logits"] = torch.cat([st["logits"][keep], new_logits]) if n_keep else new_logits
        st["fin"] = torch.zeros(len(st["alive"]), dtype=torch.bool, device=device)
        return True

    if not admit():
        return None
    st = state
    tokens, lps, length = st["tokens"], st["lps"], st["length"]
    while True:
        alive, step, fin = st["alive"], st["step"], st["fin"]
        live = ~fin
        uniform = _uniform_for(gen, row_keys, alive, step)
        tok, finished = _advance(st["logits"], cfg, uniform, live, alive, step, tokens, lps, st["eos"], calc, stops)
        step = step + live.long()
        finished |= live & (step >= T)
        if bool(finished.any()):
            ended = alive[finished]
            length[ended] = step[finished]
            qs = ended.div(k, rounding_mode="floor")
            st["left"].index_add_(0, qs, torch.full_like(qs, -1))
            if emit is not None:
                complete = sorted({q for q in qs.tolist() if int(st["left"][q]) == 0})
                if complete:
                    emit(complete, tokens, lps, length)
        fin = fin | finished
        st["step"], st["fin"] = step, fin
        n_live = len(alive) - int(fin.sum())
        if n_live == 0 and not waiting:
            break
        refill = bool(waiting) and (max_rows - n_live >= threshold or n_live == 0)
        if n_live and not refill and int(fin.sum()) >= compact_at * len(alive) and bool(fin.any()):
            # finished rows would still cost a forward each step; drop them from the cache
            keep = torch.nonzero(~fin).flatten()
            _select_rows(cache, keep)
            for name in ("alive", "next_pos", "step", "fin"):
                st[name] = st[name][keep]
            tok = tok[keep]
            st["mask"] = st["mask"][keep.to(in_dev)]
            stats["compactions"] += 1
        if n_live:
            # (before a refill this also computes the rows that just finished: the rebuild drops them without
            # a second copy of the cache)
            mask = st["mask"] = torch.cat([st["mask"], st["mask"].new_ones((len(st["alive"]), 1))], dim=-1)
            st["logits"], cache = _decode_step(
                model, tok, mask if st["padded"] else None, st["next_pos"], cache, cache_kw, extra
            )
            st["next_pos"] = st["next_pos"] + 1
            stats["row_steps"] += len(st["alive"])
        if refill and not admit():
            raise RuntimeError("cache layer types changed between prefills")
    return tokens, lps, length


def make_sample(tokenizer, cfg: SamplingConfig, eos, token_ids: list[int], token_logprobs: list[float]) -> Sample:
    """A Sample from a row's generated ids and their untempered log-probs: the text is the ids decoded (EOS
    dropped, special tokens skipped) and cut before the first stop string. Both engines build samples here."""
    body = token_ids[:-1] if token_ids and token_ids[-1] in eos else token_ids
    text = tokenizer.decode(body, skip_special_tokens=True)
    if cfg.stop:
        text = cut_at_stop(text, cfg.stop)[0]
    row = torch.tensor(token_logprobs, dtype=torch.float32)
    return Sample(
        text=text,
        token_ids=list(token_ids),
        logprob_sum=float(row.double().sum()),
        n_tokens=len(token_ids),
        token_logprobs=row.tolist(),
    )


def _collect(tokenizer, cfg, eos, tokens, lps, length, questions: list[int]) -> list[list[Sample]]:
    """Samples of the given questions (rows q * k .. q * k + k - 1 of the buffers), one transfer per buffer."""
    k = cfg.k
    rows = torch.tensor([q * k + j for q in questions for j in range(k)], dtype=torch.long, device=tokens.device)
    tokens_l, lps_l, length_l = tokens[rows].cpu().tolist(), lps[rows].cpu().tolist(), length[rows].cpu().tolist()
    result: list[list[Sample]] = []
    for i in range(len(questions)):
        samples = []
        for r in range(i * k, (i + 1) * k):
            n = length_l[r]
            samples.append(make_sample(tokenizer, cfg, eos, tokens_l[r][:n], lps_l[r][:n]))
        result.append(samples)
    return result


def generate_k(
    model,
    tokenizer,
    prompts: list[str],
    cfg: SamplingConfig,
    progress: bool = False,
    *,
    compact_at: float = 0.5,
    stats: dict[str, int] | None = None,
    preallocate_cache: bool = True,
    continuous: bool = True,
    seeds: list[int] | None = None,
    on_done: Callable[[list[tuple[int, list[Sample]]]], None] | None = None,
) -> list[list[Sample]]:
    """For each prompt, cfg.k samples (in prompt order).

    Prompts are tokenized as aftune.prompting.encode_prompt does (special tokens added, unless a rendered chat
    prompt already starts with BOS),
    sorted by length and batched `cfg.batch_size` at a time so padding is small. Finished rows are dropped
    from the cache once they are at least `compact_at` of the rows still in it (1.0+ = never before all
    finish). Deterministic for the same seed, inputs and batch size. `stats`, if given, receives counters
    (row_steps: decode rows computed; compactions). preallocate_cache=False keeps the model's own cache
    layers (concatenating each step) even where the preallocated buffer applies.

    continuous: with more prompts than cfg.batch_size, keep one running batch of cfg.batch_size * k rows and
    admit waiting prompts (longest first) as rows finish, instead of batch after batch (module docstring).
    Needs the preallocated cache (plain DynamicCache layers, or sliding-window ones whose window exceeds the
    longest prompt + max_new_tokens); otherwise, or with continuous=False, prompts go
    batch by batch. Greedy tokens are the same either way; sampled ones are deterministic for the same seed,
    inputs, batch size and `continuous`, but differ between the two schedules (the random stream is drawn in
    a different row order). With at most cfg.batch_size prompts both schedules are the same computation.
    `stats` then also counts refills. cfg.calculator: forced `result>>` after every `<<expr=` (calculator
    module); `stats["calculator_tokens"]` counts the forced tokens.

    seeds: one per prompt (replacing cfg.seed): each row's draws then depend only on its prompt's seed, its row
    and its step, so the result is the same under any schedule, batch size or company of other prompts.
    on_done([(prompt index, samples), ...]) is called as prompts finish (a caller can store them at once).
    """
    if not prompts:
        return []
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"generate_k: {len(seeds)} seeds for {len(prompts)} prompts")
    stats = stats if stats is not None else {}
    stats.setdefault("row_steps", 0)
    stats.setdefault("compactions", 0)
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos[0] if eos else 0  # any id works: padded positions are masked out
    enc = [encode_prompt(tokenizer, p) for p in prompts]
    if any(len(e) == 0 for e in enc):
        raise ValueError("generate_k: a prompt tokenized to zero tokens (empty prompt without a BOS token)")
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]), reverse=True)  # longest first: OOM shows early
    _, out_dev = _devices(model)
    gen = torch.Generator(device=out_dev)
    gen.manual_seed(cfg.seed)
    # by global row q * k + j, where the logits are (keys < 2^63 fit int64)
    keys = (
        None if seeds is None else torch.tensor([row_key(sd, j) for sd in seeds for j in range(cfg.k)], device=out_dev)
    )
    results: list[list[Sample] | None] = [None] * len(prompts)
    calc = Calculator(tokenizer) if cfg.calculator else None
    bar = tqdm(total=len(prompts), desc="sampling", unit="q", disable=not progress)

    def emit(questions, tokens, lps, length):
        done = _collect(tokenizer, cfg, eos, tokens, lps, length, questions)
        for q, samples in zip(questions, done):
            results[q] = samples
        bar.update(len(questions))
        if on_done is not None:
            on_done(list(zip(questions, done)))

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if continuous and preallocate_cache and len(order) > cfg.batch_size:
                got = _generate_continuous(
                    model, enc, order, cfg, eos, pad_id, gen, tokenizer, compact_at, stats, calc, keys, emit
                )
                if got is not None:
                    return results  # type: ignore[return-value]
            for i in range(0, len(order), cfg.batch_size):
                batch = order[i : i + cfg.batch_size]
                rows = [q * cfg.k + j for q in batch for j in range(cfg.k)]
                batch_keys = None if keys is None else keys[torch.tensor(rows, device=keys.device)]
                tokens, lps, length = _generate_batch(
                    model,
                    [enc[q] for q in batch],
                    cfg,
                    eos,
                    pad_id,
                    gen,
                    tokenizer,
                    compact_at,
                    stats,
                    preallocate_cache,
                    calc,
                    batch_keys,
                )
                done = _collect(tokenizer, cfg, eos, tokens, lps, length, list(range(len(batch))))
                for q, samples in zip(batch, done):
                    results[q] = samples
                bar.update(len(batch))
                if on_done is not None:
                    on_done(list(zip(batch, done)))
    finally:
        bar.close()
        model.train(was_training)
        if calc is not None:
            stats["calculator_tokens"] = stats.get("calculator_tokens", 0) + calc.forced
    return results  # type: ignore[return-value]


def _decode_step(model, tok, mask, next_pos, cache, cache_kw: str, extra: dict):
    """One cached decoding step of every live row: (next-token logits in fp32, the cache to use next)."""
    in_dev = mask.device if mask is not None else _devices(model)[0]
    out = model(
        input_ids=tok.unsqueeze(-1).to(in_dev),
        attention_mask=mask,
        position_ids=next_pos.unsqueeze(-1).to(in_dev),
        use_cache=True,
        **{cache_kw: cache},
        **extra,
    )
    returned = returned_cache(out)
    return out.logits[:, -1, :].float(), (returned if returned is not None else cache)
