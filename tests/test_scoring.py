import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aftune.scoring import score_groups, to_padded


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
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
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0)
    m = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 300, (64,), generator=g).tolist() for _ in range(2)]
    cands = [[torch.randint(1, 300, (96,), generator=g).tolist() for _ in range(4)] for _ in range(2)]
    a, ga = _grads(m, prompts, cands, True)
    b, gb = _grads(m, prompts, cands, False)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-5)
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)
