"""Packed candidate scoring (score_groups(pack=True), the default): values and gradients equal the padded path.

Candidates of one question are laid back to back in block-masked rows; these tests compare against
`pack=False` (one padded row per candidate) and against per-sequence full-logits scoring (`share_prefix=False,
chunk_size=0`), on lengths that vary a lot (empty, 1-token and long candidates, a question with none).
"""

from __future__ import annotations

import pytest
import torch
from tiny import char_tokenizer, tiny_llama

from aftune.scoring import _pack, score_groups


def _data(vocab, seed=3, prompt_lens=(5, 11, 2, 7), cand_lens=((9, 1, 23, 4, 0, 12), (17,), (), (3, 3, 30, 2, 8))):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [rnd(n) for n in prompt_lens], [[rnd(n) for n in cs] for cs in cand_lens]


@pytest.fixture(autouse=True)
def packed_calls(monkeypatch):
    """How often the packed candidate forward ran: a silent fallback to padding would make the tests vacuous."""
    import aftune.scoring as sc

    calls = []
    real = sc._score_packed
    monkeypatch.setattr(sc, "_score_packed", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _run(model, prompts, cands, bf16=False, **kw):
    model.zero_grad()
    w = torch.linspace(-1, 1, sum(len(c) for c in cands))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        s = score_groups(model, prompts, cands, 0, **kw)
    (s.mean * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return s.logp_sum.detach(), grads


def _same(a, b, atol=1e-4, gatol=1e-5):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, atol=atol, rtol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=gatol, rtol=1e-4, msg=n)


def _gemma3(attn, window):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256,
        final_logit_softcapping=4.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        initializer_range=0.2,
        attn_implementation=attn,
    )
    return Gemma3ForCausalLM(cfg).eval()


def test_pack_layout():
    lengths = [9, 0, 22, 3, 11, 16, 5, 22]
    group = [0, 0, 0, 0, 1, 1, 1, 1]
    rows = _pack(lengths, group, 22)
    placed = {}
    for q, items in rows:
        end = 0
        for i, off in sorted(items, key=lambda x: x[1]):
            assert group[i] == q and off >= end  # one question per row, no overlap
            end = off + lengths[i]
            placed[i] = (q, off)
        assert end <= 22
    assert sorted(placed) == [i for i, n in enumerate(lengths) if n > 0]
    assert len(rows) < sum(n > 0 for n in lengths)  # really packs


def test_packed_llama_equals_padded_and_per_sequence(packed_calls):
    tok = char_tokenizer()
    m = tiny_llama(tok)
    prompts, cands = _data(len(tok))
    packed = _run(m, prompts, cands)
    assert packed_calls == [1]
    _same(packed, _run(m, prompts, cands, pack=False))
    _same(packed, _run(m, prompts, cands, share_prefix=False, chunk_size=0))
    _same(_run(m, prompts, cands, chunk_size=5), packed)  # several head chunks


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [4, 512])  # 4: sliding layers need their own mask; 512: the window never binds
def test_packed_gemma3_sliding_window_and_softcap(attn, window, packed_calls):
    m = _gemma3(attn, window)
    prompts, cands = _data(300)
    packed = _run(m, prompts, cands)
    assert packed_calls == [1]
    _same(packed, _run(m, prompts, cands, pack=False))
    _same(packed, _run(m, prompts, cands, share_prefix=False, chunk_size=0))


def test_packed_bf16_close_to_padded_bf16():
    tok = char_tokenizer()
    m = tiny_llama(tok)
    prompts, cands = _data(len(tok))
    n = torch.tensor([max(len(c), 1) for cs in cands for c in cs], dtype=torch.float32)
    (a, ga), (b, gb) = _run(m, prompts, cands, bf16=True), _run(m, prompts, cands, bf16=True, pack=False)
    assert ((a - b).abs() <= 0.005 * n).all()
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(ga), flat(gb), dim=0) >= 0.999


def test_packing_feeds_fewer_positions():
    tok = char_tokenizer()
    m = tiny_llama(tok)
    prompts, cands = _data(len(tok))
    seen = []
    h = m.model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        with torch.no_grad():
            score_groups(m, prompts, cands, 0)
            score_groups(m, prompts, cands, 0, pack=False)
    finally:
        h.remove()
    prompt_a, packed, prompt_b, padded = seen
    assert prompt_a == prompt_b and packed < 0.7 * padded
    assert packed >= sum(max(len(c) - 1, 0) for cs in cands for c in cs)
