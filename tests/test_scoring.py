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
