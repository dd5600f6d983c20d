"""The vLLM engine (vLLM's CPU build here) against the built-in sampler on arith-base: same prompt ids, same
draws, same calculator, same log-prob meaning, same candidates files. One engine serves every test of this
module (start-up is 30-60 s); skipped where vLLM is not installed (scripts/setup.sh installs it)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from aftune.io import InputError
from aftune.modeling import load_model_and_tokenizer, resolve_model
from aftune.prompting import encode_prompt
from aftune.sampling.sampler import SamplingConfig, generate_k, question_seed
from aftune.scoring import score_groups
from aftune.tasks import get_tasks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")


@pytest.fixture(scope="module")
def hf():
    model, tok = load_model_and_tokenizer("arith-base", "float32")
    return model.eval(), tok


@pytest.fixture(scope="module")
def engine(hf):
    # both cores for the engine, and a small KV cache: this is a shared test machine
    n = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}" if n > 1 else "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from aftune.sampling.vllm_backend import get_engine

    return get_engine(resolve_model("arith-base"), hf[1], "float32")


@pytest.fixture(scope="module")
def arith():
    task = get_tasks("arith", {}, None)[0]
    return task, task.load("test")


def _cfg(task, **kw):
    return SamplingConfig(stop=tuple(task.stop), calculator=task.calculator, **kw)


def test_prompt_ids_are_aftunes_own(engine, hf, arith):
    task, exs = arith
    prompts = [task.prompt(e) for e in exs[:8]]
    engine.generate(prompts, _cfg(task, k=1, temperature=0.0, max_new_tokens=4))
    assert engine.prompt_ids == [encode_prompt(hf[1], p) for p in prompts]


def test_greedy_with_calculator_agrees_with_the_builtin_sampler(engine, hf, arith):
    """fp32 greedy decoding through both engines, the calculator on, 200 questions: >= 99% identical ids; a miss
    is a near-tie of two logits that the two engines' kernels round to different sides (printed)."""
    task, exs = arith
    exs = exs[:200]
    prompts = [task.prompt(e) for e in exs]
    cfg = _cfg(task, k=1, temperature=0.0, max_new_tokens=160, batch_size=64)
    v = engine.generate(prompts, cfg)
    h = generate_k(hf[0], hf[1], prompts, cfg)
    misses = [(e.id, a.text, b.text) for e, (a,), (b,) in zip(exs, v, h) if a.token_ids != b.token_ids]
    for m in misses:
        print("miss", m)
    assert len(misses) <= 0.01 * len(exs)
    assert sum("<<" in a.text for (a,) in v) > 100  # the calculator did run on most questions
    for e, (a,), (b,) in zip(exs, v, h):
        assert a.text == b.text or e.id in {m[0] for m in misses}


def test_sampled_candidates_are_the_builtin_samplers(engine, hf, arith):
    """Keyed draws: with the same per-question seeds both engines draw the same tokens at temperature 0.8, and
    the stored log-probs agree (vLLM's raw log-probs = logit - logsumexp of the fp32 logits)."""
    task, exs = arith
    exs = exs[:24]
    prompts = [task.prompt(e) for e in exs]
    seeds = [question_seed(3, e.id) for e in exs]
    cfg = _cfg(task, k=4, temperature=0.8, max_new_tokens=120, batch_size=8)
    v = engine.generate(prompts, cfg, seeds)
    h = generate_k(hf[0], hf[1], prompts, cfg, seeds=seeds)
    pairs = [(a, b) for x, y in zip(v, h) for a, b in zip(x, y)]
    same = sum(a.token_ids == b.token_ids for a, b in pairs)
    assert same >= 0.97 * len(pairs)
    assert len({tuple(a.token_ids) for a, _ in pairs}) > len(exs)  # really sampled: k rows differ
    for a, b in pairs:
        if a.token_ids == b.token_ids:
            assert a.text == b.text
            assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-3)


def test_logprobs_match_score_groups(engine, hf, arith):
    """The stored log-prob of each vLLM candidate is what score_groups computes for the same ids."""
    task, exs = arith
    prompts = [task.prompt(e) for e in exs[:6]]
    res = engine.generate(prompts, _cfg(task, k=3, temperature=1.0, max_new_tokens=80))
    model, tok = hf
    ids = [encode_prompt(tok, p) for p in prompts]
    with torch.no_grad():
        scored = score_groups(model, ids, [[s.token_ids for s in r] for r in res], pad_id=0)
    got = [s.logprob_sum for r in res for s in r]
    assert scored.logp_sum.tolist() == pytest.approx(got, abs=1e-3)
    assert [s.n_tokens for r in res for s in r] == scored.n_tokens.tolist()


def _run(out, **kw):
    from aftune.commands.sample import run_sample
    from aftune.config import SampleConfig

    args = dict(
        model="arith-base",
        out=str(out),
        task="arith",
        split="train",
        n_questions=12,
        k=3,
        temperature=0.8,
        max_new_tokens=100,
        batch_size=2,
        quiet=True,
    )
    return run_sample(SampleConfig(**{**args, **kw}))


def _by_id(path):
    rows = {}
    for line in open(path):
        g = json.loads(line)
        for c in g["candidates"]:
            c["score"] = round(c["score"], 4)
        rows[g["id"]] = g
    return rows


def test_candidates_files_straight_resumed_sharded_identical(engine, tmp_path, monkeypatch):
    import aftune.sampling.store as store
    from aftune.sampling.shards import merge_shards, shard_file

    straight = tmp_path / "straight.jsonl"
    stats = _run(straight, backend="vllm")
    assert stats["backend"] == "vllm"
    meta = json.loads(open(str(straight) + ".meta.json").read())
    assert meta["engine"]["name"] == "vllm" and meta["engine"]["version"]

    killed = tmp_path / "killed.jsonl"
    real, calls = store.append_jsonl, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(store, "append_jsonl", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(killed, backend="vllm")
    monkeypatch.setattr(store, "append_jsonl", real)
    assert 0 < len(open(killed).readlines()) < 12
    _run(killed, backend="vllm")

    sharded = tmp_path / "sharded.jsonl"
    for i in range(3):
        _run(sharded, backend="vllm", shard=f"{i}/3")
    merge_shards([shard_file(sharded, i, 3) for i in range(3)], tmp_path / "merged.jsonl")

    assert _by_id(straight) == _by_id(killed) == _by_id(tmp_path / "merged.jsonl")

    # a file begun by one engine is not continued by the other
    with pytest.raises(InputError) as err:
        _run(killed, backend="hf", n_questions=14)
    assert err.value.field == "engine"


def test_weights_are_not_reloaded_on_cpu(engine):
    model, _ = load_model_and_tokenizer("arith-base", "float32")
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="CPU build"):
            engine.load_weights(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's CPU build cannot reload weights (CUDA only)")
def test_weights_refreshed_into_the_engine(engine, arith):
    """Sampling from a model being trained: load_weights puts changed weights into the running engine, and its
    greedy output then follows the changed model (checked against the built-in sampler on that model)."""
    task, exs = arith
    model, tok = load_model_and_tokenizer("arith-base", "float32")
    prompts = [task.prompt(e) for e in exs[:16]]
    cfg = _cfg(task, k=1, temperature=0.0, max_new_tokens=60)
    before = [s.token_ids for (s,) in engine.generate(prompts, cfg)]
    original = {n: p.clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.model.layers[-1].mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        engine.load_weights(model)
        after = [s.token_ids for (s,) in engine.generate(prompts, cfg)]
    finally:  # the module's other tests share this engine
        model.load_state_dict(original)
        engine.load_weights(model)
    changed, _ = load_model_and_tokenizer("arith-base", "float32")
    with torch.no_grad():
        torch.manual_seed(0)
        for p in changed.model.layers[-1].mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))
    want = [s.token_ids for (s,) in generate_k(changed, tok, prompts, cfg)]
    assert after != before
    assert sum(a == w for a, w in zip(after, want)) >= len(prompts) - 1
    assert [s.token_ids for (s,) in engine.generate(prompts, cfg)] == before  # restored


def test_cpu_defaults_fill_only_what_the_user_left_unset(monkeypatch):
    from aftune.sampling.vllm_backend import cpu_defaults

    for key in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    set_now = cpu_defaults()
    assert set(set_now) == {"VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"}
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7" and os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    n = os.cpu_count() or 1
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == (f"0-{n - 1}" if n > 1 else "0")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert 1 <= int(cpu_defaults()["VLLM_CPU_KVCACHE_SPACE"]) <= 4
