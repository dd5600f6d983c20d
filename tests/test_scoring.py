import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aftune.scoring import score_groups, to_padded


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()
    prompts = [rnd(5), rnd(9), rnd(3)]
    cands = [[rnd(4), rnd(7), rnd(1)], [rnd(6)], [rnd(2), rnd(8)]]
    return prompts, cands


def _by_hand(model, prompt, resp):
    ids = torch.tensor([prompt + resp])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(resp))


def test_shared_prefix_equals_per_sequence_scores_and_grads(model):
    prompts, cands = _data()
    shared = score_groups(model, prompts, cands, pad_id=0, share_prefix=True)
    naive = score_groups(model, prompts, cands, pad_id=0, share_prefix=False)
    expected = [_by_hand(model, p, r) for p, cs in zip(prompts, cands) for r in cs]
    assert torch.allclose(shared.logp_sum, torch.tensor(expected), atol=1e-4)
    assert torch.allclose(naive.logp_sum, torch.tensor(expected), atol=1e-4)
    assert shared.n_tokens.tolist() == [4, 7, 1, 6, 2, 8]
    assert shared.group_index.tolist() == [0, 0, 0, 1, 2, 2]

    w = torch.linspace(-1, 1, 6)
    grads = []
    for share in (True, False):
        model.zero_grad()
        (score_groups(model, prompts, cands, 0, share).mean * w).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_question_without_candidates_costs_nothing(model):
    prompts, cands = _data()
    cands[1] = []
    s = score_groups(model, prompts, cands, 0)
    assert s.group_index.tolist() == [0, 0, 0, 2, 2]
    full = score_groups(model, [prompts[0], prompts[2]], [cands[0], cands[2]], 0)
    assert torch.allclose(s.logp_sum, full.logp_sum, atol=1e-5)


def test_to_padded_layout():
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    gi = torch.tensor([0, 0, 2, 2])
    out, valid = to_padded(vals, gi, 3)
    assert out.tolist() == [[1, 2], [0, 0], [3, 4]]
    assert valid.tolist() == [[True, True], [False, False], [True, True]]


def test_empty_response_mean_is_zero(model):
    s = score_groups(model, [[1, 2, 3]], [[[4, 5], []]], 0)
    assert s.mean[1].item() == 0.0 and s.n_tokens.tolist() == [2, 0]


def _grads(model, prompts, cands, share, bf16=False):
    model.zero_grad()
    w = torch.linspace(-1, 1, sum(len(c) for c in cands))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        s = score_groups(model, prompts, cands, 0, share)
    (s.mean * w).sum().backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    return s.logp_sum.detach(), g


def test_without_logits_to_keep_same_result(model, monkeypatch):
    # models whose forward has no `logits_to_keep` take the full-logits path: same numbers
    import aftune.scoring as sc

    prompts, cands = _data()
    a, ga = _grads(model, prompts, cands, True)
    monkeypatch.setattr(sc, "_keeps_logits", lambda m: False)
    b, gb = _grads(model, prompts, cands, True)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-6)


# bf16 autocast: matmuls in bf16 (8-bit mantissa), log-softmax in fp32. Documented tolerance against
# the fp32 per-sequence reference: |score error| <= 0.005 nats per response token, gradient cosine
# >= 0.999 and relative L2 error <= 0.03 (measured here: 2e-4 nats/token, cosine 0.99999, L2 0.005).
# Shared-prefix vs naive, both in bf16, agree to the same bound.
def test_bf16_autocast_close_to_fp32_reference(model):
    prompts, cands = _data()
    n = torch.tensor([len(c) for cs in cands for c in cs], dtype=torch.float32)
    ref, gref = _grads(model, prompts, cands, False)
    for share in (True, False):
        s, g = _grads(model, prompts, cands, share, bf16=True)
        assert s.dtype == torch.float32
        assert ((s - ref).abs() <= 0.005 * n).all(), (s - ref) / n
        cos = torch.nn.functional.cosine_similarity(g, gref, dim=0)
        assert cos >= 0.999 and (g - gref).norm() / gref.norm() <= 0.03, (cos, (g - gref).norm() / gref.norm())


def test_bf16_shared_prefix_matches_bf16_naive(model):
    prompts, cands = _data()
    n = torch.tensor([len(c) for cs in cands for c in cs], dtype=torch.float32)
    a, ga = _grads(model, prompts, cands, True, bf16=True)
    b, gb = _grads(model, prompts, cands, False, bf16=True)
    assert ((a - b).abs() <= 0.005 * n).all()
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) >= 0.999


def test_fp32_grads_exact_on_bench_shapes():
    # the benchmark's shapes (prompt 64, response 96, k=4) on a small Llama: exact within fp32 tolerance
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    m = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 300, (64,), generator=g).tolist() for _ in range(2)]
    cands = [[torch.randint(1, 300, (96,), generator=g).tolist() for _ in range(4)] for _ in range(2)]
    a, ga = _grads(m, prompts, cands, True)
    b, gb = _grads(m, prompts, cands, False)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-5)
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)


# --- chunked LM head (score_groups(chunk_size=...)): every test compares against chunk_size=0, the
# full-logits path (z at every position, log_softmax over all of them) that the tests above validate.


def _rand_data(vocab, seed=1, prompt_lens=(5, 9, 3), cand_lens=((4, 7, 1), (6,), (2, 8))):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [rnd(n) for n in prompt_lens], [[rnd(n) for n in cs] for cs in cand_lens]


def _scores_and_grads(model, prompts, cands, share, chunk_size, bf16=False):
    """logp_sum and {name: grad} of a weighted length-normalised score sum (all trainable parameters)."""
    model.zero_grad()
    w = torch.linspace(-1, 1, sum(len(c) for c in cands))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        s = score_groups(model, prompts, cands, 0, share, chunk_size=chunk_size)
    (s.mean * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return s.logp_sum.detach(), grads


def _assert_same(a, b, head_names):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4, msg=n)
    for n in head_names:  # the head (or tied embedding) really gets a gradient, and the same one
        assert ga[n].abs().max() > 1e-3, n


def _tiny_gemma3(vocab=2048, softcap=4.0, seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    # sliding window 4 < the 6..17-token sequences, layers alternating sliding / full attention, tied
    # embeddings (Gemma's default), a soft-cap small enough to change every score by nats
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256,
        final_logit_softcapping=softcap,
        tie_word_embeddings=True,
        pad_token_id=0,
        initializer_range=0.2,
        attn_implementation="eager",
    )
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gemma3():
    return _tiny_gemma3()


@pytest.mark.parametrize("share", [True, False])
def test_chunked_head_equals_full_logits_llama(share):
    from tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    m = tiny_llama(tok)  # untied lm_head
    prompts, cands = _rand_data(len(tok))
    ref = _scores_and_grads(m, prompts, cands, share, chunk_size=0)
    for chunk in (3, None):  # 3 < the 28 response tokens: ten chunks, the last one partial
        _assert_same(_scores_and_grads(m, prompts, cands, share, chunk), ref, ["lm_head.weight"])


@pytest.mark.parametrize("share", [True, False])
def test_chunked_head_equals_full_logits_gemma3(gemma3, share):
    assert gemma3.lm_head.weight is gemma3.model.embed_tokens.weight
    prompts, cands = _rand_data(2048)
    ref = _scores_and_grads(gemma3, prompts, cands, share, chunk_size=0)
    expected = [_by_hand(gemma3, p, r) for p, cs in zip(prompts, cands) for r in cs]
    torch.testing.assert_close(ref[0], torch.tensor(expected), atol=1e-4, rtol=1e-5)
    for chunk in (5, None):
        _assert_same(_scores_and_grads(gemma3, prompts, cands, share, chunk), ref, ["model.embed_tokens.weight"])


def test_gemma3_shared_prefix_equals_per_sequence(gemma3):
    prompts, cands = _rand_data(2048)
    for chunk in (0, 5):
        _assert_same(
            _scores_and_grads(gemma3, prompts, cands, True, chunk),
            _scores_and_grads(gemma3, prompts, cands, False, chunk),
            ["model.embed_tokens.weight"],
        )


def test_gemma3_softcap_and_sliding_window_matter(gemma3):
    # guards the two tests above: if the cap or the window changed nothing they would prove nothing
    prompts, cands = _rand_data(2048)
    base = score_groups(gemma3, prompts, cands, 0, chunk_size=3).logp_sum.detach()
    for attr, value in (("final_logit_softcapping", None), ("sliding_window", 1000)):
        old = getattr(gemma3.config, attr)
        setattr(gemma3.config, attr, value)
        try:
            other = score_groups(gemma3, prompts, cands, 0, chunk_size=3).logp_sum.detach()
        finally:
            setattr(gemma3.config, attr, old)
        assert (base - other).abs().max() > 0.1, attr


def test_chunked_head_bf16_autocast(gemma3, monkeypatch):
    # the head matmul runs in the autocast dtype (as inside the model's forward), log-softmax in fp32;
    # chunked vs full logits, both in bf16, within the bf16 bounds documented above
    import aftune.scoring as sc

    seen = []
    real = sc._Head.logits

    def logits(self, h, forward=None):  # the chunks call the head's forward inside one head call (_in_head)
        seen.append((forward or self.head)(h).dtype)
        return real(self, h, forward)

    monkeypatch.setattr(sc._Head, "logits", logits)
    prompts, cands = _rand_data(2048)
    n = torch.tensor([len(c) for cs in cands for c in cs], dtype=torch.float32)
    a, ga = _scores_and_grads(gemma3, prompts, cands, True, 5, bf16=True)
    monkeypatch.undo()
    assert seen and set(seen) == {torch.bfloat16} and a.dtype == torch.float32
    b, gb = _scores_and_grads(gemma3, prompts, cands, True, 0, bf16=True)
    assert ((a - b).abs() <= 0.005 * n).all(), (a - b) / n
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(ga), flat(gb), dim=0) >= 0.999


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]])
def test_chunked_head_under_peft_lora(targets):
    peft = pytest.importorskip("peft")
    from tiny import char_tokenizer, tiny_llama

    import aftune.scoring as sc

    tok = char_tokenizer()
    torch.manual_seed(0)
    # random (not zero) LoRA B, so the adapter changes the scores and every adapter weight gets a gradient
    m = peft.get_peft_model(
        tiny_llama(tok), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    assert sc._find_head(m) is not None  # the chunked path is really taken through the wrapper
    prompts, cands = _rand_data(len(tok))
    head = [n for n, p in m.named_parameters() if p.requires_grad and "lm_head" in n]
    assert len(head) == (2 if "lm_head" in targets else 0)
    for share in (True, False):
        ref = _scores_and_grads(m, prompts, cands, share, chunk_size=0)
        _assert_same(_scores_and_grads(m, prompts, cands, share, 4), ref, head)


def test_chunked_head_under_ddp(tmp_path):
    # DDP (one gloo process): the forward still goes through DDP, so its reducer sees a normal step
    import torch.distributed as dist
    from tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    m = tiny_llama(tok)
    prompts, cands = _rand_data(len(tok))
    ref = _scores_and_grads(m, prompts, cands, True, chunk_size=0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        import aftune.scoring as sc

        assert sc._find_head(ddp) is not None
        for _ in range(2):  # a second step: the reducer finished the first one cleanly
            v, g = _scores_and_grads(ddp, prompts, cands, True, 3)
            _assert_same((v, {n.removeprefix("module."): x for n, x in g.items()}), ref, ["lm_head.weight"])
    finally:
        dist.destroy_process_group()


def test_unknown_architecture_takes_exact_path(model, monkeypatch):
    import aftune.scoring as sc

    monkeypatch.setattr(sc, "_HEADS", {})
    assert sc._find_head(model) is None
    prompts, cands = _data()
    _assert_same(
        _scores_and_grads(model, prompts, cands, True, 3), _scores_and_grads(model, prompts, cands, True, 0), []
    )


def _largest_logits(fn, vocab):
    """Most rows of any vocab-wide float tensor an op creates while fn() runs (views of existing storage, such
    as the transposed head weight, do not count): the size of the biggest logits-like allocation."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Probe(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not any(r.alias_info is not None for r in func._schema.returns):
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.shape[-1] == vocab:
                        Probe.rows = max(Probe.rows, t.numel() // vocab)
            return out

    with Probe():
        fn()
    return Probe.rows


@pytest.mark.parametrize("share", [True, False])
def test_chunked_head_never_allocates_more_than_one_chunk_of_logits(gemma3, share):
    prompts, cands = _rand_data(2048)
    n_resp = sum(len(c) for cs in cands for c in cs)

    def step(chunk):
        return lambda: _scores_and_grads(gemma3, prompts, cands, share, chunk)

    assert _largest_logits(step(0), 2048) >= n_resp  # the probe sees the full-logits path's tensors
    assert _largest_logits(step(5), 2048) <= 5  # forward and backward alike


def _peak_alloc_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) by torch's CPU allocator while fn() runs, from the profiler's
    allocation events (exact and deterministic, unlike RSS). kineto_results is where torch keeps every
    "[memory]" event; prof.events() drops allocations made outside a recorded op."""
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
    return peak


@pytest.mark.parametrize("share", [True, False])
def test_chunked_head_peak_memory(share):
    # vocab 16384 >> hidden 32, 140 response tokens: full fp32 logits are 8.75 MiB, bigger than everything else
    # (the tied embedding's gradient is 2 MiB). Measured: 45 MiB (share) / 73 MiB (per sequence) with full logits,
    # 4.9 / 5.2 MiB with 8-position chunks, and each extra chunk row costs ~2.6 fp32 vocab rows.
    V = 16384
    torch.manual_seed(0)
    m = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
    )
    prompts, cands = _rand_data(V, prompt_lens=(10, 20), cand_lens=((30, 25, 20, 15), (30, 25, 20, 15)))
    row = V * 4  # one fp32 vocab-wide row
    n = sum(len(c) for cs in cands for c in cs)

    def step(chunk):
        def f():
            m.zero_grad(set_to_none=True)
            score_groups(m, prompts, cands, 0, share, chunk_size=chunk).mean.sum().backward()

        return f

    full, c8, c32 = (_peak_alloc_bytes(step(c)) for c in (0, 8, 32))
    assert full - c8 >= 2 * n * row  # the full path holds at least two [n, V] fp32 tensors at once ...
    assert c8 < min(full / 4, n * row)  # not even one [n, V] tensor: checkpointed chunks free their logits
    assert 0 < c32 - c8 <= 4 * (32 - 8) * row  # ... the chunked one a few [chunk, V] ones
