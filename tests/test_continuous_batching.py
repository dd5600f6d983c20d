"""generate_k's continuous batching: finished rows are refilled with waiting prompts, results unchanged.

Greedy tokens must equal batch-by-batch sampling and HF generate; every sampled token's log-prob must equal
a full forward over (prompt + tokens), which fails on any wrong position id, mask column or cache row.
"""

from __future__ import annotations

import pytest
import torch
from tiny import char_tokenizer, tiny_llama

from aftune.sampling import SamplingConfig, generate_k

torch.set_num_threads(1)
PROMPTS = [
    "what is 2+3?",
    "a",
    "hello there 12 + 7 =",
    "x y z",
    "tom has 4 pens. he gets 9 more.",
    "q",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "abc def",
    "zz top",
]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(tok)

    def hook(_mod, _inp, out):  # EOS likely: rows end at very different steps, so slots free up early
        out = out.clone()
        out[..., 1] += 2.0
        return out

    m.lm_head.register_forward_hook(hook)
    return m


def full_forward_logprob(model, tok, prompt: str, token_ids: list[int]) -> float:
    p = tok(prompt)["input_ids"]
    ids = torch.tensor([p + token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(logp[len(p) - 1 :].gather(-1, ids[0, len(p) :, None]).sum())


def ids(res):
    return [[s.token_ids for s in r] for r in res]


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_same_as_batch_by_batch_and_generate(model, tok, k):
    cfg = SamplingConfig(k=k, temperature=0.0, max_new_tokens=40, batch_size=2)
    st = {}
    cont = generate_k(model, tok, PROMPTS, cfg, stats=st)
    static = generate_k(model, tok, PROMPTS, cfg, continuous=False)
    assert st["refills"] >= 3  # prompts really joined a running batch
    assert ids(cont) == ids(static)
    lens = {s.n_tokens for r in cont for s in r}
    assert len(lens) > 2 and max(lens) >= 4 * min(lens)  # rows stop at very different steps
    for prompt, r in zip(PROMPTS, cont):
        p = tok(prompt, return_tensors="pt")["input_ids"]
        ref = model.generate(p, do_sample=False, max_new_tokens=40, pad_token_id=0, eos_token_id=1)
        assert all(s.token_ids == ref[0, p.shape[1] :].tolist() for s in r), prompt
        for s, t in zip(r, static[PROMPTS.index(prompt)]):
            assert s.text == t.text and s.logprob_sum == pytest.approx(t.logprob_sum, abs=1e-4)


def test_sampled_rows_have_exact_logprobs_and_are_reproducible(model, tok):
    cfg = SamplingConfig(k=4, temperature=1.0, top_p=0.95, max_new_tokens=30, batch_size=2, seed=5)
    st = {}
    a = generate_k(model, tok, PROMPTS, cfg, stats=st)
    b = generate_k(model, tok, PROMPTS, cfg)
    assert st["refills"] >= 3
    assert ids(a) == ids(b) and [[s.logprob_sum for s in r] for r in a] == [[s.logprob_sum for s in r] for r in b]
    assert [len(r) for r in a] == [4] * len(PROMPTS)
    for prompt, r in zip(PROMPTS, a):
        for s in r:
            assert s.n_tokens == len(s.token_ids) and 1 not in s.token_ids[:-1]
            assert s.logprob_sum == pytest.approx(full_forward_logprob(model, tok, prompt, s.token_ids), abs=1e-4)


def test_one_batch_is_the_same_computation(model, tok):
    # store.py calls generate_k with at most batch_size prompts: its files must not change
    cfg = SamplingConfig(k=3, temperature=1.0, max_new_tokens=20, batch_size=len(PROMPTS), seed=2)
    assert ids(generate_k(model, tok, PROMPTS, cfg)) == ids(generate_k(model, tok, PROMPTS, cfg, continuous=False))


def test_running_batch_stays_full_and_never_exceeds_its_rows(model, tok):
    cfg = SamplingConfig(k=2, temperature=0.0, max_new_tokens=40, batch_size=3)
    sizes = {"cont": [], "static": []}
    for name, cont in (("cont", True), ("static", False)):
        h = model.register_forward_pre_hook(
            lambda _m, _a, kw, n=name: sizes[n].append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        try:
            generate_k(model, tok, PROMPTS, cfg, continuous=cont)
        finally:
            h.remove()
    decode = {n: [b for b, t in v if t == 1] for n, v in sizes.items()}
    assert max(decode["cont"]) <= 3 * 2
    assert len(decode["cont"]) < len(decode["static"])  # fewer decode steps: the tail no longer idles slots
    assert sum(t for _, t in sizes["cont"] if t > 1) > 0


def _gemma3(tok, window):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        num_hidden_layers=3,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        initializer_range=0.2,
    )
    return Gemma3ForCausalLM(cfg).eval()


def test_sliding_window_model_falls_back_to_batches_where_the_window_binds(tok):
    m = _gemma3(tok, window=4)
    sc = SamplingConfig(k=2, temperature=1.0, max_new_tokens=10, batch_size=2, seed=1)
    st = {}
    a = generate_k(m, tok, PROMPTS[:5], sc, stats=st)
    assert "refills" not in st or st["refills"] == 0
    assert ids(a) == ids(generate_k(m, tok, PROMPTS[:5], sc, continuous=False))
    for prompt, r in zip(PROMPTS[:5], a):  # the model's own sliding cache: still exact
        for s in r:
            assert s.logprob_sum == pytest.approx(full_forward_logprob(m, tok, prompt, s.token_ids), abs=1e-4)


@pytest.mark.parametrize("margin", [1, 40])
def test_sliding_window_that_cannot_bind_gets_continuous_batching(tok, margin):
    # longest prompt + max_new_tokens < window: the sliding layers hold every column, refills apply
    T = 12
    span = max(len(tok(p)["input_ids"]) for p in PROMPTS) + T
    m = _gemma3(tok, window=span + margin)
    greedy = SamplingConfig(k=2, temperature=0.0, max_new_tokens=T, batch_size=2)
    st = {}
    cont = generate_k(m, tok, PROMPTS, greedy, stats=st)
    assert st["refills"] >= 3
    assert ids(cont) == ids(generate_k(m, tok, PROMPTS, greedy, continuous=False))
    for prompt, r in zip(PROMPTS, cont):
        p = tok(prompt, return_tensors="pt")["input_ids"]
        ref = m.generate(p, do_sample=False, max_new_tokens=T, pad_token_id=0, eos_token_id=1)
        assert all(s.token_ids == ref[0, p.shape[1] :].tolist() for s in r), prompt
    st = {}
    sampled = generate_k(
        m, tok, PROMPTS, SamplingConfig(k=3, temperature=1.0, max_new_tokens=T, batch_size=2), stats=st
    )
    assert st["refills"] >= 3
    for prompt, r in zip(PROMPTS, sampled):
        for s in r:
            assert s.logprob_sum == pytest.approx(full_forward_logprob(m, tok, prompt, s.token_ids), abs=1e-4)


def test_sliding_window_preallocation_only_where_the_window_cannot_bind(tok, monkeypatch):
    import aftune.sampling.sampler as sampler

    made = []
    real = sampler._PreallocatedLayer.__init__

    def spy(self, *a, **kw):
        made.append(1)
        real(self, *a, **kw)

    monkeypatch.setattr(sampler._PreallocatedLayer, "__init__", spy)
    T = 8
    span = max(len(tok(p)["input_ids"]) for p in PROMPTS[:2]) + T
    sc = SamplingConfig(k=2, temperature=0.0, max_new_tokens=T, batch_size=2)
    for window, expect in ((span, False), (span + 1, True)):
        made.clear()
        m = _gemma3(tok, window)
        out = generate_k(m, tok, PROMPTS[:2], sc)
        assert bool(made) is expect, window
        for prompt, r in zip(PROMPTS[:2], out):
            p = tok(prompt, return_tensors="pt")["input_ids"]
            ref = m.generate(p, do_sample=False, max_new_tokens=T, pad_token_id=0, eos_token_id=1)
            assert all(s.token_ids == ref[0, p.shape[1] :].tolist() for s in r), (window, prompt)
