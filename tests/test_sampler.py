"""generate_k: exact greedy decoding, exact untempered log-probs, one prefill per batch, stops, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import char_tokenizer, tiny_llama

from aftune.sampling import Sample, SamplingConfig, generate_k

torch.set_num_threads(1)
PROMPTS = ["what is 2+3?", "a", "hello there 12 + 7 =", "x y z", "tom has 4 pens. he gets 9 more."]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


def full_forward_logprob(model, tok, prompt: str, token_ids: list[int]) -> float:
    p = tok(prompt)["input_ids"]
    ids = torch.tensor([p + token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(logp[len(p) - 1 :].gather(-1, ids[0, len(p) :, None]).sum())


def boost_eos(model, amount: float):
    """Raise the EOS logit so rows finish at different steps (exercises finished-row handling)."""

    def hook(_mod, _inp, out):
        out = out.clone()
        out[..., 1] += amount
        return out

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("preallocate", [True, False])
def test_greedy_matches_generate_and_full_forward_logprobs(model, tok, preallocate):
    cfg = SamplingConfig(k=1, temperature=0.0, max_new_tokens=24, batch_size=3)  # batches mix lengths: padding
    res = generate_k(model, tok, PROMPTS, cfg, preallocate_cache=preallocate)
    assert len(res) == len(PROMPTS) and all(len(r) == 1 for r in res)
    for prompt, (s,) in zip(PROMPTS, res):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=0, eos_token_id=1)
        assert s.token_ids == ref[0, ids.shape[1] :].tolist(), prompt
        assert s.n_tokens == len(s.token_ids)
        assert s.logprob_sum == pytest.approx(full_forward_logprob(model, tok, prompt, s.token_ids), abs=1e-4)


@pytest.mark.parametrize("preallocate", [True, False])
def test_eos_handling_and_row_dropping_do_not_change_results(model, tok, preallocate):
    handle = boost_eos(model, 4.0)
    try:
        cfg = SamplingConfig(k=1, temperature=0.0, max_new_tokens=30, batch_size=5)
        st_drop, st_keep = {}, {}
        dropped = generate_k(model, tok, PROMPTS, cfg, compact_at=0.25, stats=st_drop, preallocate_cache=preallocate)
        kept = generate_k(model, tok, PROMPTS, cfg, compact_at=2.0, stats=st_keep)  # never drop early
        lens = {r[0].n_tokens for r in dropped}
        assert len(lens) > 1 and any(r[0].token_ids[-1] == 1 for r in dropped)  # rows end at different steps
        assert st_drop["compactions"] > 0 and st_keep["compactions"] == 0
        assert st_drop["row_steps"] < st_keep["row_steps"]
        for prompt, (a,), (b,) in zip(PROMPTS, dropped, kept):
            assert a.token_ids == b.token_ids and a.text == b.text
            assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            ref = model.generate(ids, do_sample=False, max_new_tokens=30, pad_token_id=0, eos_token_id=1)
            assert a.token_ids == ref[0, ids.shape[1] :].tolist()
            if a.token_ids[-1] == 1:  # EOS counted in tokens and log-prob, absent from the text
                assert a.text == tok.decode(a.token_ids[:-1], skip_special_tokens=True)
                assert 1 not in a.token_ids[:-1]
            assert a.logprob_sum == pytest.approx(full_forward_logprob(model, tok, prompt, a.token_ids), abs=1e-4)
    finally:
        handle.remove()


def test_sampled_logprobs_are_untempered_and_k_rows_per_prompt(model, tok):
    cfg = SamplingConfig(k=4, temperature=0.5, top_p=0.9, max_new_tokens=12, batch_size=2, seed=3)
    res = generate_k(model, tok, PROMPTS, cfg)
    assert [len(r) for r in res] == [4] * len(PROMPTS)
    for prompt, samples in zip(PROMPTS, res):
        for s in samples:
            assert s.logprob_sum == pytest.approx(full_forward_logprob(model, tok, prompt, s.token_ids), abs=1e-4)
            assert s.score == pytest.approx(s.logprob_sum / s.n_tokens)
            assert s.text == tok.decode([t for t in s.token_ids if t != 1], skip_special_tokens=True)


def test_prompt_prefilled_once_per_batch(model, tok):
    calls: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        generate_k(model, tok, PROMPTS, SamplingConfig(k=8, max_new_tokens=5, batch_size=3))
    finally:
        handle.remove()
    prefills = [c for c in calls if c[1] > 1]
    # 5 prompts, 3 per batch: two prefills of the questions themselves (not k copies), longest first
    assert [b for b, _ in prefills] == [3, 2]
    assert all(c == (3 * 8, 1) for c in calls[1:5]) and len(calls) == 2 * 5


def test_seed_determinism(model, tok):
    cfg = SamplingConfig(k=3, temperature=1.0, max_new_tokens=16, batch_size=2, seed=7)
    a = generate_k(model, tok, PROMPTS, cfg)
    b = generate_k(model, tok, PROMPTS, cfg)
    c = generate_k(model, tok, PROMPTS, SamplingConfig(k=3, temperature=1.0, max_new_tokens=16, batch_size=2, seed=8))
    ids = lambda res: [[s.token_ids for s in r] for r in res]  # noqa: E731
    assert ids(a) == ids(b)
    assert [[s.logprob_sum for s in r] for r in a] == [[s.logprob_sum for s in r] for r in b]
    assert ids(a) != ids(c)
    assert len({tuple(s.token_ids) for s in a[0]}) > 1  # the k rows of one prompt are different draws


def test_tiny_top_p_is_greedy(model, tok):
    greedy = generate_k(model, tok, PROMPTS, SamplingConfig(k=1, temperature=0.0, max_new_tokens=16))
    nucleus = generate_k(model, tok, PROMPTS, SamplingConfig(k=2, temperature=1.0, top_p=1e-6, max_new_tokens=16))
    for g, n in zip(greedy, nucleus):
        assert n[0].token_ids == g[0].token_ids == n[1].token_ids


def test_stop_strings_cut_text_and_end_the_row(model, tok):
    stop = ("a", "e", "1")
    cfg = SamplingConfig(k=4, temperature=1.0, max_new_tokens=20, stop=stop, seed=1)
    res = generate_k(model, tok, PROMPTS, cfg)
    n_stopped = 0
    for samples in res:
        for s in samples:
            assert not any(x in s.text for x in stop)
            body = [t for t in s.token_ids if t != 1]
            full = tok.decode(body, skip_special_tokens=True)
            if any(x in full for x in stop):
                n_stopped += 1
                assert not any(
                    x in tok.decode(body[:-1], skip_special_tokens=True) for x in stop
                )  # ended at the first occurrence
                assert full.startswith(s.text) and full[len(s.text)] in "ae1"
            else:
                assert s.text == full
    assert n_stopped > 0


def test_sample_score_and_config_validation():
    assert Sample("", [], 0.0, 0).score == 0.0
    assert Sample("x", [5, 6], -3.0, 2).score == -1.5
    for bad in (
        dict(k=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(batch_size=0),
        dict(max_new_tokens=0),
        dict(stop=("",)),
    ):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    assert SamplingConfig(stop=["x"]).stop == ("x",)
    assert generate_k(None, None, [], SamplingConfig()) == []
    assert math.isfinite(SamplingConfig().temperature)


def test_generate_k_restores_training_mode(model, tok):
    model.train()
    try:
        generate_k(model, tok, PROMPTS[:1], SamplingConfig(k=2, max_new_tokens=3))
        assert model.training
    finally:
        model.eval()


def test_vllm_backend_missing_dependency_message(monkeypatch):
    import sys

    from aftune.sampling.vllm_backend import generate_k_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'aftune\[vllm\]'"):
        generate_k_vllm("some/model", ["q"], SamplingConfig(k=2))


def _has_vllm_and_cuda() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_vllm_and_cuda(), reason="needs vllm and a CUDA device")
def test_vllm_backend_samples_and_scores(tmp_path, tok):
    from aftune.sampling.vllm_backend import generate_k_vllm

    model = tiny_llama(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts = PROMPTS[:3]
    res = generate_k_vllm(
        tmp_path,
        prompts,
        SamplingConfig(k=3, temperature=0.8, max_new_tokens=12, seed=0),
        gpu_memory_utilization=0.3,
        enforce_eager=True,
    )
    assert [len(r) for r in res] == [3] * len(prompts)
    for prompt, samples in zip(prompts, res):
        for s in samples:
            assert 0 < s.n_tokens <= 12 and s.n_tokens == len(s.token_ids)
            # raw log-probs (not tempered): match a float32 HF forward pass closely
            assert s.logprob_sum == pytest.approx(full_forward_logprob(model, tok, prompt, s.token_ids), abs=5e-2)


def test_preallocated_layer_matches_concatenation_and_grows():
    from aftune.sampling.sampler import _PreallocatedLayer

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    layer = _PreallocatedLayer(keys, values, repeats=3, capacity=5)  # too small on purpose: must grow
    ref_k, ref_v = keys.repeat_interleave(3, 0), values.repeat_interleave(3, 0)
    for step in range(4):
        nk, nv = torch.randn(6, 3, 1, 5, generator=g), torch.randn(6, 3, 1, 6, generator=g)
        k, v = layer.update(nk, nv)
        ref_k, ref_v = torch.cat([ref_k, nk], 2), torch.cat([ref_v, nv], 2)
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v) and layer.get_seq_length() == 5 + step
    idx = torch.tensor([4, 0])
    layer.batch_select_indices(idx)
    assert torch.equal(layer.keys, ref_k[idx]) and torch.equal(layer.values, ref_v[idx])
    layer.crop(-2)
    assert torch.equal(layer.keys, ref_k[idx][:, :, :-2])
