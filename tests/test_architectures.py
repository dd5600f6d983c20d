"""Every architecture `aftune.scoring._HEADS` names, on a tiny random model of its own class.

Per class: (a) the default scoring path (shared prompt, packed candidates, chunked LM head) equals per-sequence
full-logits scoring, values and gradients, and the chunked plan and the packed forward are really taken; (b) the
sampler's greedy tokens equal `model.generate`, batch by batch and continuously batched; (c) the installed
transformers still applies the head, the logit transform and the attention masks the way `_HEADS`, `_HEAD_CODE`
and `_MASK_DICT` record, both in the source (what `_find_head` checks at run time) and in numbers (the class's own
logits against `_Head.logits` of its hidden states). Sliding windows (4 tokens, shorter than most sequences here)
and logit soft-caps / scales / divisors are on wherever the class has them. fp32 throughout.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import pytest
import torch
import transformers
from tiny import char_tokenizer

import aftune.scoring as sc
from aftune.sampling import SamplingConfig, generate_k
from aftune.scoring import score_groups

torch.set_num_threads(1)

WINDOW = 4  # binds: prompts of 2-20 and candidates of 1-17 tokens
HYBRID = ["sliding_attention", "full_attention"]
COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=None,
    initializer_range=0.2,  # peaked logits: greedy ties cannot hide a wrong token, the soft-cap really bends
)
# class -> (config class, what differs from COMMON). Embeddings tied or not as the class's config defaults
# (Qwen2 tied, as its small checkpoints ship); eager attention where the class soft-caps attention scores.
SPECS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", dict(sliding_window=WINDOW)),  # every layer sliding
    "Qwen2ForCausalLM": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=HYBRID, tie_word_embeddings=True),
    ),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=HYBRID)),
    "Phi3ForCausalLM": ("Phi3Config", dict(sliding_window=WINDOW)),
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    "SmolLM3ForCausalLM": (
        "SmolLM3Config",
        dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=HYBRID, no_rope_layers=[0, 1]),
    ),
    "GemmaForCausalLM": ("GemmaConfig", dict(head_dim=8)),
    "Gemma2ForCausalLM": (
        "Gemma2Config",
        dict(
            head_dim=8,
            sliding_window=WINDOW,
            layer_types=HYBRID,
            final_logit_softcapping=4.0,
            attn_logit_softcapping=10.0,
            attn_implementation="eager",
        ),
    ),
    "Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        dict(head_dim=8, sliding_window=WINDOW, layer_types=HYBRID, final_logit_softcapping=4.0),
    ),
    "CohereForCausalLM": ("CohereConfig", dict(logit_scale=0.5)),
    "Cohere2ForCausalLM": ("Cohere2Config", dict(sliding_window=WINDOW, layer_types=HYBRID, logit_scale=0.5)),
    "GraniteForCausalLM": (
        "GraniteConfig",
        dict(logits_scaling=2.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3),
    ),
}
NAMES = list(SPECS)
SLIDING = {n for n, (_, kw) in SPECS.items() if "sliding_window" in kw}
TRANSFORM = {"softcap": 4.0, "scale": 0.5, "divide": 2.0}  # the value each kind's plan must carry

PROMPTS = ["what is 2+3?", "a", "hello there 12 + 7 =", "x y z", "tom has 4 pens."]


def test_every_listed_class_is_specified_here():
    assert set(SPECS) == set(sc._HEADS) and sc._MASK_DICT <= set(SPECS)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@functools.cache
def _model(name: str):
    cfg_name, kw = SPECS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(vocab_size=len(char_tokenizer()), **{**COMMON, **kw})
    return getattr(transformers, name)(cfg).eval()


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return _model(request.param)


class _Window:
    """config.sliding_window set to `value` for a while (masks and caches read it at each forward)."""

    def __init__(self, model, value):
        self.cfg, self.value = model.config, value

    def __enter__(self):
        self.old = self.cfg.sliding_window
        self.cfg.sliding_window = self.value

    def __exit__(self, *exc):
        self.cfg.sliding_window = self.old


def _data(vocab, seed=3):
    # lengths vary a lot: an empty and a 1-token candidate, a question without candidates
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rnd(n) for n in (5, 11, 2, 7)]
    cands = [[rnd(n) for n in cs] for cs in ((9, 1, 13, 4, 0, 12), (17,), (), (3, 3, 15, 2, 8))]
    return prompts, cands


def _run(model, prompts, cands, **kw):
    model.zero_grad()
    s = score_groups(model, prompts, cands, 0, **kw)
    w = torch.linspace(-1, 1, len(s.logp_sum))
    (s.mean * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return s.logp_sum.detach(), grads


def _by_hand(model, prompt, resp):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + resp])).logits[0, :-1].float(), -1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(resp))


def test_plan_and_source_checks(model):
    """The run-time source checks pass on the installed transformers, and the plan carries the right transform."""
    name = type(model).__name__
    assert sc._head_code_ok(type(model))
    assert sc._mask_uses(type(model.model)) == (True, name in sc._MASK_DICT)
    plan = sc._find_head(model)
    kind = sc._HEADS[name]
    assert plan is not None and plan.kind == kind and plan.value == TRANSFORM.get(kind)
    assert plan.packable and plan.mask_dict == (name in sc._MASK_DICT)


def test_head_transform_equals_the_class_forward(model):
    """The class's own logits at every position equal _Head.logits of its decoder's hidden states: a transformers
    release with another transform fails here even where the source check would not see it."""
    plan = sc._find_head(model)
    ids = torch.tensor([_data(len(char_tokenizer()))[1][0][0]])
    with torch.no_grad():
        own = model(input_ids=ids).logits[0].float()
        h = model.model(input_ids=ids).last_hidden_state[0]
        mine, raw = plan.logits(h), model.get_output_embeddings()(h).float()
    torch.testing.assert_close(mine, own, atol=1e-5, rtol=1e-5)
    if plan.kind is not None:  # guards the line above: the transform changes the logits
        assert (mine - raw).abs().max() > 0.1


def test_packed_chunked_scores_equal_per_sequence(model, monkeypatch):
    """score_groups' default path equals per-sequence full-logits scoring and the model's own forward; the chunked
    head (default chunk and 3-position chunks) and the packed forward are really taken, with a dict of per-type
    masks on hybrid sliding / full models. Tolerances as tests/test_packing.py: values 1e-4 nats, gradients 1e-5."""
    name = type(model).__name__
    prompts, cands = _data(model.config.vocab_size)
    packed_masks, chunked = [], []
    real_packed, real_head = sc._score_packed, sc._head_logps
    monkeypatch.setattr(sc, "_score_packed", lambda *a, **k: packed_masks.append(a[8].mask) or real_packed(*a, **k))
    monkeypatch.setattr(sc, "_head_logps", lambda *a, **k: chunked.append(a[3]) or real_head(*a, **k))

    ref = _run(model, prompts, cands, share_prefix=False, chunk_size=0)
    assert not chunked  # the reference is the full-logits path
    expected = [_by_hand(model, p, r) for p, cs in zip(prompts, cands) for r in cs]
    torch.testing.assert_close(ref[0], torch.tensor(expected), atol=1e-4, rtol=1e-5)
    for chunk in (None, 3):
        got = _run(model, prompts, cands, chunk_size=chunk)
        torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-5)
        assert got[1].keys() == ref[1].keys() and ref[1]
        for n in ref[1]:
            torch.testing.assert_close(got[1][n], ref[1][n], atol=1e-5, rtol=1e-4, msg=f"{name} {n}")
    head = model.get_output_embeddings().weight
    assert head.requires_grad and ref[1][[n for n, p in model.named_parameters() if p is head][0]].abs().max() > 1e-3
    assert chunked == [None, 3] and len(packed_masks) == 2
    hybrid = name in SLIDING and len(set(getattr(model.config, "layer_types", None) or ())) == 2
    assert all(isinstance(m, dict) == hybrid for m in packed_masks)

    if name in SLIDING:  # guards the comparison: the 4-token window changes the scores
        with torch.no_grad(), _Window(model, 1000):
            wide = score_groups(model, prompts, cands, 0).logp_sum
        assert (wide - ref[0]).abs().max() > 0.1


def _generate_ref(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=1)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_sampler_equals_generate(model, tok):
    """generate_k at temperature 0 (left-padded batches of 2) equals model.generate token for token, with exact
    untempered log-probs: batch by batch (with the binding window on the model's own sliding cache), and
    continuously batched (sliding classes with the window widened past every row, which continuous batching
    needs), where prompts really join a running batch."""
    cfg = SamplingConfig(k=1, temperature=0.0, max_new_tokens=12, batch_size=2)
    batch = generate_k(model, tok, PROMPTS, cfg, continuous=False)
    for prompt, (s,) in zip(PROMPTS, batch):
        assert s.token_ids == _generate_ref(model, tok, prompt, 12), prompt
        p = tok(prompt)["input_ids"]
        assert s.logprob_sum == pytest.approx(_by_hand(model, p, s.token_ids), abs=1e-4)
    assert len({tuple(s.token_ids) for (s,) in batch}) > 2  # the prompts get different answers

    stats = {}
    with _Window(model, 64) if type(model).__name__ in SLIDING else contextlib.nullcontext():
        cont = generate_k(model, tok, PROMPTS, cfg, stats=stats)
        assert stats.get("refills", 0) >= 2  # the continuous path ran, and admitted prompts into a running batch
        for prompt, (s,) in zip(PROMPTS, cont):
            assert s.token_ids == _generate_ref(model, tok, prompt, 12), prompt


# --- the run-time checks catch a changed transformers


class LlamaForCausalLM(transformers.LlamaForCausalLM):
    """A "new release" of Llama whose forward doubles the logits: the name _HEADS lists, another transform."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        logits = logits * 2.0
        loss = None
        return transformers.modeling_outputs.CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values
        )


def test_changed_head_transform_takes_exact_path_with_a_warning():
    m = LlamaForCausalLM(_model("LlamaForCausalLM").config).eval()
    with pytest.warns(RuntimeWarning, match="no longer applies the LM head"):
        assert sc._find_head(m) is None
    prompts, cands = _data(m.config.vocab_size)
    with torch.no_grad():
        got = score_groups(m, prompts, cands, 0).logp_sum
    expected = [_by_hand(m, p, r) for p, cs in zip(prompts, cands) for r in cs]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-5)  # the doubled logits' scores


def test_bidirectional_gemma_takes_exact_path():
    # Gemma's encoder mode masks bidirectionally in its own forward; the packed path's masks are causal
    cfg = _model("Gemma3ForCausalLM").config.to_dict()
    m = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**cfg, "use_bidirectional_attention": True}))
    assert sc._find_head(m) is None and sc._find_head(_model("Gemma3ForCausalLM")) is not None


# stand-ins for the names the decoder sources below call (they are parsed, never run)
create_causal_mask = my_own_mask = None


class _DictDecoder:
    def forward(self, attention_mask=None):
        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {"config": self.config, "attention_mask": attention_mask}
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
        for i, layer in enumerate(self.layers):
            layer(attention_mask=causal_mask_mapping[self.config.layer_types[i]])


class _PlainDecoder:
    def forward(self, attention_mask=None):
        causal_mask = create_causal_mask(config=self.config, attention_mask=attention_mask)
        for layer in self.layers:
            layer(attention_mask=causal_mask)


class _OwnMaskDecoder:
    def forward(self, attention_mask=None):
        causal_mask = my_own_mask(attention_mask)
        for layer in self.layers:
            layer(attention_mask=causal_mask)


def test_mask_source_check():
    assert sc._mask_uses(_DictDecoder) == (True, True)
    assert sc._mask_uses(_PlainDecoder) == (True, False)
    assert sc._mask_uses(_OwnMaskDecoder) == (False, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sc._mask_code(_PlainDecoder, False) == (True, False)
    with pytest.warns(RuntimeWarning, match="a dict of per-layer-type masks"):
        sc._mask_code(_PlainDecoder, True)  # a _MASK_DICT class whose decoder lost the dict
    with pytest.warns(RuntimeWarning, match="a prepared 4-D attention mask"):
        sc._mask_code(_OwnMaskDecoder, False)
