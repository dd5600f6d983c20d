"""Log-likelihood of k candidate responses per question, with the prompt computed once.

`score_groups` runs each question's prompt through the model once, then reuses its KV cache for all
of that question's candidates (rows selected with `batch_select_indices`, so a question with 3
candidates costs 3 rows, not K_max). Gradients flow through the cache back into the prompt, so the
result equals scoring every (prompt + candidate) sequence on its own (see tests/test_scoring.py).

Memory: the log-probability of response token y_t is

    log p(y_t) = z_{y_t} - logsumexp(z),    z = post(lm_head(h_{t-1}))

(h the decoder's last hidden state, `post` the model's own logit transform: Gemma's tanh soft-cap, Cohere's
scale, Granite's divisor). Materialising z for every position costs positions x vocab floats: k=8 x 256 tokens x
262,144 (Gemma 3) is 2 GB in fp32, twice that for log-softmax, again for its gradient. So on known
architectures (`_HEADS`) the model runs with its head skipped (`logits_to_keep` = no position), the hidden
states are taken only where a response token is predicted, and the head is applied `chunk_size` positions at a
time, each chunk under `torch.utils.checkpoint`: its logits are freed as soon as its log-probs are reduced and
recomputed one chunk at a time in backward. Anything else (unknown class, a listed class whose installed forward
no longer applies the head as `_HEAD_CODE` records, FSDP1 wrappers, prompt-learning adapters, no `logits_to_keep`)
takes the exact full-logits path, which is also the reference the tests compare against (`chunk_size=0`).

Sharded models (FSDP2 `fully_shard`, DeepSpeed ZeRO-3) keep the chunked path, with the head weight gathered once
per scoring call (`_in_head`):
- ZeRO-3: the weight exists whole only inside a call of the head module, between the engine's gather and release
  hooks. So the whole chunk loop runs as one call `head(h)` with the loop as its forward: the pre-forward hook
  gathers the partitions, the post-forward hook releases them, and in backward the hooks DeepSpeed puts on the
  call's output and input gather the weight again for the chunks' recomputation, then release it; the gradient
  reaches the partitions through ZeRO's parameter hooks as usual.
- FSDP2: the model's own forward has just called the head (on no position), so the head's FSDP group is
  unsharded, and stays so until its post-backward when it does not reshard after forward (accelerate's layout:
  final norm + head, `reshard_after_forward=False`; the root never reshards after forward). The chunks use that
  unsharded weight directly, and their gradient lands in its `.grad`, which FSDP2's post-backward reduce-scatters
  with the rest of the group. A head whose group did reshard is unsharded once (`FSDPModule.unshard()`); FSDP2's
  end-of-backward callback then reduce-scatters and reshards it. (A second, standalone call of a grouped head
  module through its hooks crashes torch 2.13 in backward, so the hooks are not used here.) On the shared-prompt
  path each candidate's first token is scored from the prompt forward's own last-position logits instead of its
  hidden state (`_score_shared_chunked`): the group's final norm must get its backward for that forward while
  FSDP2 still holds it gathered, which it does only through the head's output of that forward.
tests/test_scoring_sharded.py checks values and gradients against the unsharded path with two gloo processes, for
both engines and three FSDP2 layouts. DDP and unwrapped models take the ZeRO-3 route, where the call has no hooks.

Padding: candidates of one question differ in length (GSM8K: tens to hundreds of tokens), and padding every
one to the longest costs positions x (hidden work + attention). On the chunked path the candidates are
therefore packed (`_pack`): each row holds several candidates of one question back to back, first-fit by
decreasing length into rows as wide as the longest candidate, under a block-causal 4-D mask (a candidate sees
its question's prompt and its own earlier tokens, never a neighbour) with per-token position ids. Rows are no
wider than the padded ones, so attention never costs more than padding, and the linear layers see close to
the real token count. Exact: tests/test_packing.py checks values and gradients against the padded path.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from aftune.modeling import forward_params, forward_with_cache
from aftune.prompting import encode_prompt

# Logits per LM-head chunk when chunk_size is None: 2**26 = 256 MiB per fp32 [chunk, vocab] tensor; a chunk's
# backward holds about three of them (tests/test_scoring.py measures ~2.6 rows per position). That is 256 positions
# at Gemma 3's 262,144 tokens, 2048 at Llama 2's 32,000. Smaller is not cheaper: every chunk's backward also makes
# a [vocab, hidden] weight-gradient contribution that autograd adds into the head's gradient, a fixed cost per
# chunk. Measured (bench/bench_memory.py, vocab 262,144, hidden 640, 1 layer, k=8 responses of 1,165 tokens in all,
# fp32, 2 CPU threads on a shared host):
# 64 positions 88 s / 2058 MiB allocator peak, 256: 53 s / 2059 MiB, 1024: 73 s / 4874 MiB (one run each).
CHUNK_LOGITS = 2**26

# CausalLM class -> what its forward does to lm_head's output before returning logits (read from the
# transformers 5.x modeling files). Only these take the chunked path: for any other class we cannot know
# the transform, and a silently different z would be a wrong score. Every entry is tested on a tiny random model
# (tests/test_architectures.py, transformers 5.19.0; docs/real-models.md has the table), and at run time
# `_head_code_ok` checks that the installed transformers still has the forward these entries describe.
_HEADS = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "Phi3ForCausalLM": None,
    "Olmo2ForCausalLM": None,
    "SmolLM3ForCausalLM": None,
    "GemmaForCausalLM": None,
    "Gemma2ForCausalLM": "softcap",
    "Gemma3ForCausalLM": "softcap",  # cap * tanh(z / cap), cap from config
    "CohereForCausalLM": "scale",
    "Cohere2ForCausalLM": "scale",  # z * logit_scale
    "GraniteForCausalLM": "divide",  # z / config.logits_scaling
}


# Classes whose decoder forward accepts a dict of per-layer-type 4-D masks (transformers 5.x
# `causal_mask_mapping := attention_mask`); needed to pack hybrid sliding / full models past the window.
_MASK_DICT = {
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "SmolLM3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Cohere2ForCausalLM",
}

# The statements of a _HEADS class's forward from its decoder's output to `loss = None` (ast.unparse form),
# per kind: the hidden states the chunks take, the head applied to them, then the transform `_Head.logits`
# repeats. A transformers release that changes them (another transform, a norm before the head) makes
# `_find_head` fall back to the exact full-logits path with a warning instead of scoring a different z.
_HEAD_PREFIX = (
    "hidden_states = outputs.last_hidden_state",
    "slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep",
    "logits = self.lm_head(hidden_states[:, slice_indices, :])",
)
_HEAD_CODE = {
    None: _HEAD_PREFIX,
    "softcap": _HEAD_PREFIX
    + (
        "if self.config.final_logit_softcapping is not None:\n"
        "    logits = logits / self.config.final_logit_softcapping\n"
        "    logits = torch.tanh(logits)\n"
        "    logits = logits * self.config.final_logit_softcapping",
    ),
    "scale": _HEAD_PREFIX + ("logits = logits * self.logit_scale",),
    "divide": _HEAD_PREFIX + ("logits = logits / self.config.logits_scaling",),
}
# Decoder-forward calls that receive the caller's `attention_mask` and return a prepared 4-D mask as it is
# (transformers.masking_utils); `mask_function` is Mistral's / Phi-3's name for one of the two.
_MASK_FUNCTIONS = {"create_causal_mask", "create_sliding_window_causal_mask", "mask_function"}


@dataclass
class Scored:
    logp_sum: torch.Tensor  # [N] summed log-probability of each candidate's response tokens
    n_tokens: torch.Tensor  # [N] number of response tokens
    group_index: torch.Tensor  # [N] which question each candidate belongs to

    @property
    def mean(self) -> torch.Tensor:
        """Length-normalised score s(c) = logp_sum / |c| (0 for an empty response)."""
        return torch.where(
            self.n_tokens > 0, self.logp_sum / self.n_tokens.clamp(min=1), torch.zeros_like(self.logp_sum)
        )


def pad_sequences(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [N, max len] long: right padding for training rows, left padding for
    prompts (every row's last token then sits at the same position)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), max(width, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), max(width, 1)), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        if left:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # float32 log-softmax even under bf16 autocast: scores differ by hundredths of a nat.
    # (one fused log_softmax kernel measured faster on CPU than gather - logsumexp)
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in forward_params(model)


@dataclass
class _Head:
    """What the chunked path needs from a model: where its final hidden states come out, and its head."""

    decoder: torch.nn.Module  # the module whose output.last_hidden_state feeds lm_head
    head: torch.nn.Module  # lm_head (nn.Linear, possibly peft-wrapped; for tied embeddings its weight is shared)
    kind: str | None  # entry of _HEADS
    value: float | None  # the cap / scale / divisor
    vocab: int  # for the default chunk size
    attn: str | None = None  # config._attn_implementation: the packed path builds masks for sdpa / eager only
    mask_dict: bool = False  # the decoder takes {"full_attention": m, "sliding_attention": m} as attention_mask
    layer_types: tuple[str, ...] | None = None  # config.layer_types (hybrid sliding / full models)
    packable: bool = True  # the decoder takes a prepared 4-D mask as given (`_mask_code`)
    fsdp_owner: torch.nn.Module | None = None  # FSDP2: the fully_shard module whose group holds the head weight

    def logits(self, h: torch.Tensor, forward=None) -> torch.Tensor:
        """z for hidden states h [n, H] -> [n, V] float32: the matmul in the ambient (autocast) dtype, the
        transform in fp32 (the model's own forward would soft-cap in bf16 under autocast; fp32 is closer to
        the fp32 model and equal to it without autocast). `forward`: the head's own forward, called without its
        module hooks (inside `_in_head`); default: a plain call of the head."""
        z = (forward or self.head)(h).float()
        if self.kind == "softcap":
            z = torch.tanh(z / self.value) * self.value
        elif self.kind == "scale":
            z = z * self.value
        elif self.kind == "divide":
            z = z / self.value
        return z


def _find_head(model) -> _Head | None:
    """The chunked-head plan for `model`, or None where only the exact full-logits path is safe.

    Looks through DistributedDataParallel and DeepSpeed's engine (their forward is still the one called, so
    gradient sync and ZeRO's hooks are intact), FSDP2's `fully_shard` (which renames the class FSDP<name>), and
    peft adapters that leave positions alone (LoRA & co., not prompt learning, which prepends virtual tokens).
    FSDP1's wrapper is not looked through: no plan for it.
    """
    inner = model
    for _ in range(4):
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel) or (
            type(inner).__name__ == "DeepSpeedEngine" and isinstance(getattr(inner, "module", None), torch.nn.Module)
        ):
            inner = inner.module
        elif hasattr(inner, "get_base_model") and hasattr(inner, "peft_config"):
            cfg = getattr(inner, "active_peft_config", None)
            if cfg is None or getattr(cfg, "is_prompt_learning", True):
                return None
            inner = inner.get_base_model()
        else:
            break
    cls = _model_class(inner)
    name = cls.__name__
    if name not in _HEADS or not _keeps_logits(model):
        return None
    decoder, head = getattr(inner, "model", None), inner.get_output_embeddings()
    if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return None
    if not _head_code_ok(cls):
        return None
    if getattr(inner.config, "use_bidirectional_attention", False):
        return None  # Gemma's encoder mode: the packed masks here are causal, the model's own would not be
    takes_4d, takes_dict = _mask_code(_model_class(decoder), name in _MASK_DICT)
    kind, value = _HEADS[name], None
    if kind == "softcap":
        value = getattr(inner.config, "final_logit_softcapping", None)
        kind = kind if value else None
    elif kind == "scale":
        value = float(inner.logit_scale)
    elif kind == "divide":
        value = float(inner.config.logits_scaling)
    types = getattr(inner.config, "layer_types", None)
    owner = next((m for m in (head, inner) if _is_fsdp2(m)), None)
    if owner is None and any(_is_fsdp2(m) for m in inner.modules()):
        return None  # sharded, but not by a group we can name (the head's or the root's): full logits
    return _Head(
        decoder,
        head,
        kind,
        value,
        int(inner.config.vocab_size),
        attn=getattr(inner.config, "_attn_implementation", None),
        mask_dict=name in _MASK_DICT and takes_dict,
        layer_types=tuple(types) if types else None,
        packable=takes_4d,
        fsdp_owner=owner,
    )


def _statements(fn) -> list[ast.stmt] | None:
    """The body of a function's source (docstring dropped), or None where the source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    except (OSError, TypeError, SyntaxError):
        return None
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.FunctionDef) else None
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body


def _head_tail(cls) -> tuple[str, ...] | None:
    """`cls.forward` from its decoder's output up to `loss = None`, as in _HEAD_CODE (None: no such stretch)."""
    body = _statements(cls.forward)
    code = [ast.unparse(s) for s in body or ()]
    start = next((i for i, c in enumerate(code) if c == _HEAD_PREFIX[0]), None)
    end = next((i for i, c in enumerate(code) if c == "loss = None"), None)
    if start is None or end is None or end < start:
        return None
    return tuple(code[start:end])


@functools.cache
def _head_code_ok(cls) -> bool:
    """Does the installed `cls.forward` apply the head and transform `_HEADS` says? Once per class; a warning
    where it does not (the caller then scores on the exact full-logits path)."""
    kind = _HEADS.get(cls.__name__)
    if _head_tail(cls) == _HEAD_CODE.get(kind):
        return True
    warnings.warn(
        f"aftune: {cls.__module__}.{cls.__name__}.forward no longer applies the LM head as aftune.scoring._HEADS "
        f"records ({kind!r}); scoring it on the exact full-logits path (more memory). Update _HEADS / _HEAD_CODE "
        "after checking the new transform (tests/test_architectures.py).",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def _mask_uses(cls) -> tuple[bool, bool]:
    """(passes `attention_mask` to a masking_utils mask builder, takes a dict of masks via
    `causal_mask_mapping := attention_mask` and indexes it per layer) for a decoder class's forward."""
    body = _statements(cls.forward)
    takes_4d = walrus = indexed = False
    for node in ast.walk(ast.Module(body=body or [], type_ignores=[])):
        if isinstance(node, ast.Call):
            func = node.func.id if isinstance(node.func, ast.Name) else None
            for kw in node.keywords:
                if kw.arg != "attention_mask":
                    continue
                v = kw.value
                takes_4d |= func in _MASK_FUNCTIONS and isinstance(v, ast.Name) and v.id == "attention_mask"
                indexed |= isinstance(v, ast.Subscript) and ast.unparse(v.value) == "causal_mask_mapping"
        elif isinstance(node, ast.Dict):  # mask_kwargs = {..., "attention_mask": attention_mask, ...}
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "attention_mask":
                    takes_4d |= isinstance(v, ast.Name) and v.id == "attention_mask"
        elif isinstance(node, ast.NamedExpr):
            walrus |= ast.unparse(node) == "(causal_mask_mapping := attention_mask)"
    return takes_4d, walrus and indexed


@functools.cache
def _mask_code(cls, want_dict: bool) -> tuple[bool, bool]:
    """_mask_uses, once per decoder class, with a warning where a packed mask could not be given (want_dict: the
    class is in _MASK_DICT): packing is then off, for hybrid sliding / full batches or altogether (the padded
    candidate rows take ordinary 2-D masks, exact on any decoder)."""
    takes_4d, takes_dict = _mask_uses(cls)
    if not takes_4d or (want_dict and not takes_dict):
        warnings.warn(
            f"aftune: {cls.__module__}.{cls.__name__}.forward no longer takes "
            f"{'a dict of per-layer-type masks' if takes_4d else 'a prepared 4-D attention mask'} as "
            "aftune.scoring expects; candidates are scored unpacked there (update _MASK_DICT / _mask_uses after "
            "checking, tests/test_architectures.py).",
            RuntimeWarning,
            stacklevel=3,
        )
    return takes_4d, takes_dict


def _is_fsdp2(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return False
    return isinstance(module, FSDPModule)


def _model_class(module) -> type:
    """The model's own class: fully_shard swaps it for a subclass FSDP<cls>(FSDPModule, cls) with the same forward."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return cls
    if isinstance(module, FSDPModule) and len(cls.__bases__) == 2 and cls.__bases__[0] is FSDPModule:
        return cls.__bases__[1]
    return cls


def _in_head(plan: _Head, fn, h: torch.Tensor) -> torch.Tensor:
    """fn(h, forward) with the head's whole weight available (forward: the head's own forward).

    FSDP2: the head's group is unsharded (once, if it is not already) and fn runs on it directly. Otherwise fn
    runs as the forward of one call `head(h)`, through the module's hooks, so a ZeRO-3 engine holds the whole
    weight for exactly this call and attaches its backward hooks to h and to the result (module docstring)."""
    head = plan.head
    if plan.fsdp_owner is not None:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in head.parameters()):
            plan.fsdp_owner.unshard()
        return fn(h, head.forward)
    own = head.__dict__.get("forward")
    forward = head.forward
    head.forward = lambda x: fn(x, forward)
    try:
        return head(h)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _forward_hidden(model, plan: _Head, cache=None, keep_last: bool = False, **inputs):
    """model(...) with the LM head applied to no position; returns (last hidden states, cache, autocast state).
    keep_last: the head applied to the last position instead; its logits are then returned as got["logits"].

    The call goes through the top-level model (and its wrappers' forward: DDP's reducer, accelerate's
    autocast) and a forward hook on the decoder picks up its output. The autocast state seen inside is
    returned so the head chunks, which run outside that forward, use the same one.
    """
    got = {}

    def hook(module, args, output):
        h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        dev = h.device.type
        got["h"] = h
        got["autocast"] = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))

    handle = plan.decoder.register_forward_hook(hook)
    try:
        keep = 1 if keep_last else torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
        out, cache = forward_with_cache(model, cache, logits_to_keep=keep, **inputs)
    finally:
        handle.remove()
    if keep_last:
        got["autocast"] += (out.logits[:, -1],)
    return got["h"], cache, got["autocast"]


def _chunk_logps(plan: _Head, h: torch.Tensor, targets: torch.Tensor, forward=None) -> torch.Tensor:
    z = plan.logits(h, forward)
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _head_logps(
    plan: _Head,
    h: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None,
    autocast: tuple[str, bool, torch.dtype],
) -> torch.Tensor:
    """log p(targets[i]) = z_i[targets[i]] - logsumexp(z_i), z_i = post(lm_head(h[i])), for h [n, H] -> [n] fp32.

    chunk_size positions at a time; with grad enabled each chunk is checkpointed, so neither forward nor
    backward ever holds more than one chunk's [chunk_size, V] logits (and their gradient). All chunks run inside
    one call of the head module (`_in_head`), so a sharded head weight is gathered once for all of them.
    """
    if chunk_size is None:
        chunk_size = max(1, CHUNK_LOGITS // max(1, plan.vocab))
    dev, enabled, dtype = autocast

    def chunks(x: torch.Tensor, forward) -> torch.Tensor:
        out = []
        for s in range(0, x.shape[0], chunk_size):
            hc, tc = x[s : s + chunk_size], targets[s : s + chunk_size]
            if torch.is_grad_enabled():
                out.append(checkpoint(_chunk_logps, plan, hc, tc, forward, use_reentrant=False))
            else:
                out.append(_chunk_logps(plan, hc, tc, forward))
        return torch.cat(out)

    with torch.autocast(dev, dtype=dtype, enabled=enabled):
        return _in_head(plan, chunks, h)


def _masked_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [mask.sum()] (row-major order of the True entries of mask [N, L]) -> per-row sums [N]."""
    full = values.new_zeros(mask.shape).masked_scatter(mask, values)
    return full.sum(-1)


def score_groups(
    model,
    prompts: list[list[int]],
    candidates: list[list[list[int]]],
    pad_id: int,
    share_prefix: bool = True,
    chunk_size: int | None = None,
    pack: bool = True,
) -> Scored:
    """Score every candidate (token ids) of every question (prompt token ids).

    Returns flattened per-candidate results in question order; logp_sum[c] = sum_t log p(y_t | prompt, y_<t)
    with log p(y_t) = z_{y_t} - logsumexp(z) in float32. With share_prefix=False every (prompt + candidate)
    sequence is run separately (the reference implementation).

    chunk_size: LM-head positions per chunk on the chunked path (see the module docstring); None picks
    CHUNK_LOGITS // vocab; 0 turns chunking off (full logits at every position: the exact reference path,
    also used for models `_find_head` does not know).

    pack: on the shared-prefix chunked path, pack candidates into block-masked rows instead of padding each
    to the longest (see the module docstring); False keeps one padded row per candidate.
    """
    counts = [len(c) for c in candidates]
    flat = [c for cs in candidates for c in cs]
    device = next(model.parameters()).device
    group_index = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(counts, dtype=torch.long))
    n_tokens = torch.tensor([len(c) for c in flat], dtype=torch.long, device=device)
    if not flat:
        z = torch.zeros(0, device=device)
        return Scored(z, n_tokens, group_index)
    # all-empty responses: nothing to put through the head; the exact path keeps the result in the graph
    plan = _find_head(model) if chunk_size != 0 and any(flat) else None
    if not share_prefix:
        return Scored(
            _score_naive(model, [prompts[g] for g in group_index.tolist()], flat, pad_id, device, plan, chunk_size),
            n_tokens,
            group_index,
        )

    keep = [i for i, c in enumerate(counts) if c > 0]  # questions without candidates cost nothing
    p_ids, p_mask = pad_sequences([prompts[i] for i in keep], pad_id, left=True)
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    rows = torch.repeat_interleave(
        torch.arange(len(keep), device=device), torch.tensor([counts[i] for i in keep], device=device)
    )
    c_ids, c_mask = pad_sequences(flat, pad_id, left=False)
    c_ids, c_mask = c_ids.to(device), c_mask.to(device)
    attn = torch.cat([p_mask[rows], c_mask], dim=1)
    pos = p_mask.sum(-1)[rows].unsqueeze(1) + torch.arange(c_ids.shape[1], device=device)
    if plan is not None:
        return Scored(
            _score_shared_chunked(
                model, plan, chunk_size, p_ids, p_mask, p_pos, rows, c_ids, c_mask, attn, pos, flat if pack else None
            ),
            n_tokens,
            group_index,
        )

    # only the last prompt position's logits are needed (they predict each candidate's first token)
    kw = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    out, cache = forward_with_cache(
        model, input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True, **kw
    )
    cache.batch_select_indices(rows)  # each question's prompt state, once per candidate; differentiable
    first = _token_logps(out.logits[:, -1][rows], c_ids[:, 0]) * c_mask[:, 0]
    if c_ids.shape[1] > 1:
        # the last position predicts nothing: no LM head there
        kw = {"logits_to_keep": slice(0, -1)} if kw else {}
        out2, _ = forward_with_cache(
            model, cache, input_ids=c_ids, attention_mask=attn, position_ids=pos, use_cache=False, **kw
        )
        logits = out2.logits if kw else out2.logits[:, :-1]
        rest = (_token_logps(logits, c_ids[:, 1:]) * c_mask[:, 1:]).sum(-1)
    else:
        rest = torch.zeros_like(first)
    return Scored(first + rest, n_tokens, group_index)


def _score_shared_chunked(
    model, plan: _Head, chunk_size, p_ids, p_mask, p_pos, rows, c_ids, c_mask, attn, pos, flat=None
):
    """The shared-prompt path with the head chunked: same two forwards, the head skipped in both. With `flat`
    (the candidates' token ids) the candidate forward is packed where `_packed_inputs` can mask it exactly."""
    # FSDP2: the prompt forward's final norm + head must see the gradient of its own output, or FSDP2 has resharded
    # them (after the candidate forward's backward) by the time the norm's backward runs; so there each
    # candidate's first token is scored from that forward's own last-position logits ([questions, V], one row per
    # question), not from its hidden state through the chunks.
    first_in_model = plan.fsdp_owner is not None
    hp, cache, ac = _forward_hidden(
        model,
        plan,
        keep_last=first_in_model,
        input_ids=p_ids,
        attention_mask=p_mask,
        position_ids=p_pos,
        use_cache=True,
    )
    first = None
    if first_in_model:
        *ac, z = ac
        ac = tuple(ac)
        z = z.float()
        first = (z[rows, c_ids[:, 0]] - torch.logsumexp(z, dim=-1)[rows]) * c_mask[:, 0]
    if flat is not None and c_ids.shape[1] > 1:
        packed = _packed_inputs(plan, cache, flat, rows, p_mask, p_pos, hp.dtype)
        if packed is not None:
            return _score_packed(model, plan, chunk_size, hp, cache, ac, flat, rows, packed, first)
    # hidden state predicting candidate token j: the prompt's last position (left-padded: column -1) for
    # j = 0, candidate position j-1 after it
    pred = [hp[:, -1][rows].unsqueeze(1)]
    if c_ids.shape[1] > 1:
        cache.batch_select_indices(rows)
        # the last candidate position predicts nothing, so it is not fed at all (causal: nothing before it changes)
        hc, _, _ = _forward_hidden(
            model,
            plan,
            cache,
            input_ids=c_ids[:, :-1],
            attention_mask=attn[:, :-1],
            position_ids=pos[:, :-1],
            use_cache=False,
        )
        pred.append(hc)
    sel = c_mask.bool()
    if first is not None:  # token 0 already scored
        sel[:, 0] = False
    h = torch.cat(pred, dim=1)[sel]  # [response tokens, H]: the head runs on these positions only
    if h.shape[0] == 0:
        return first
    rest = _masked_sums(_head_logps(plan, h, c_ids[sel], chunk_size, ac), sel)
    return rest if first is None else first + rest


@dataclass
class _Packed:
    ids: torch.Tensor  # [R, W] candidate tokens (all but each candidate's last), pad elsewhere
    pos: torch.Tensor  # [R, W] position ids
    row_q: torch.Tensor  # [R] prompt row (kept question) of each packed row
    mask: torch.Tensor | dict  # [R, 1, W, keys] 4-D mask, or one per layer type
    start: list[int]  # flat index into [R * W] of each candidate's first fed token


def _pack(lengths: list[int], group: list[int], width: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """First-fit decreasing bin packing of segments (lengths[i] > 0, question group[i]) into rows of `width`,
    never mixing questions (a row attends one prompt). Returns [(question, [(segment, offset), ...]), ...]."""
    rows: list[tuple[int, list[tuple[int, int]]]] = []
    free: list[int] = []
    open_rows: dict[int, list[int]] = {}  # question -> its row indices
    for i in sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (group[i], -lengths[i], i)):
        q, n = group[i], lengths[i]
        mine = open_rows.setdefault(q, [])
        r = next((r for r in mine if free[r] >= n), None)
        if r is None:
            r = len(rows)
            rows.append((q, []))
            free.append(width)
            mine.append(r)
        rows[r][1].append((i, width - free[r]))
        free[r] -= n
    return rows


def _packed_inputs(plan: _Head, cache, flat, rows, p_mask, p_pos, dtype) -> _Packed | None:
    """Packed candidate inputs and their exact attention mask(s), or None where this model cannot take them
    (attention other than sdpa / eager, or sliding-window layers it cannot be given a per-type mask for)."""
    if not plan.packable or plan.attn not in ("sdpa", "eager"):
        return None
    # per cache layer: (prompt columns it kept after the prefill, sliding window or None)
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    p_len = p_mask.shape[1]
    lengths = [max(len(c) - 1, 0) for c in flat]  # the last token predicts nothing: not fed
    width = max(lengths)
    kinds = []
    for layer in layers:
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        kept = int(layer.keys.shape[-2]) if window else p_len
        if window is not None and kept == p_len and p_len + width <= window:
            window = None  # every visible pair is closer than the window: a full layer for this batch
        kinds.append((kept, window))
    distinct = sorted(set(kinds), key=lambda x: (x[1] is not None, x))
    if len(distinct) > 1:
        types = plan.layer_types
        if not (plan.mask_dict and types and len(types) == len(kinds) and len(distinct) == 2):
            return None
        if {t for t, k in zip(types, kinds) if k[1] is None} != {"full_attention"} or {
            t for t, k in zip(types, kinds) if k[1] is not None
        } != {"sliding_attention"}:
            return None

    device = p_mask.device
    group = rows.tolist()
    packing = _pack(lengths, group, width)
    n_rows = len(packing)
    ids = torch.zeros((n_rows, width), dtype=torch.long)  # padding slots: any valid id, they see only themselves
    seg = torch.full((n_rows, width), -1, dtype=torch.long)
    off_pos = torch.zeros((n_rows, width), dtype=torch.long)  # token index within its candidate
    row_q = torch.tensor([q for q, _ in packing], dtype=torch.long)
    start = [-1] * len(flat)
    for r, (_, items) in enumerate(packing):
        for j, (i, off) in enumerate(items):
            n = lengths[i]
            ids[r, off : off + n] = torch.tensor(flat[i][:n])
            seg[r, off : off + n] = j
            off_pos[r, off : off + n] = torch.arange(n)
            start[i] = r * width + off
    ids, seg, off_pos, row_q = ids.to(device), seg.to(device), off_pos.to(device), row_q.to(device)
    pos = p_mask.sum(-1)[row_q].unsqueeze(1) + off_pos  # each candidate continues its prompt's positions
    real = seg >= 0
    # candidate part: same segment, causal; padding slots attend only themselves (no all-masked softmax row,
    # which would put NaN into the backward of everything)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same = (seg.unsqueeze(2) == seg.unsqueeze(1)) & real.unsqueeze(2) & causal
    same |= torch.eye(width, dtype=torch.bool, device=device) & ~real.unsqueeze(2)
    q_prompt = p_mask.bool()[row_q]  # [R, P] real prompt columns
    q_ppos = p_pos[row_q]

    def build(kept: int, window: int | None) -> torch.Tensor:
        pm = q_prompt[:, p_len - kept :].unsqueeze(1) & real.unsqueeze(2)
        cm = same
        if window is not None:  # HF's rule: key visible iff q - k < window (positions = columns here)
            pm = pm & (pos.unsqueeze(2) - q_ppos[:, p_len - kept :].unsqueeze(1) < window)
            cm = cm & (pos.unsqueeze(2) - pos.unsqueeze(1) < window)
        m = torch.cat([pm, cm], dim=-1).unsqueeze(1)
        if plan.attn == "eager":  # eager attention adds the mask to the scores
            return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, torch.finfo(dtype).min)
        return m

    if len(distinct) == 1:
        mask: torch.Tensor | dict = build(*distinct[0])
    else:
        full = next(k for k in distinct if k[1] is None)
        slide = next(k for k in distinct if k[1] is not None)
        mask = {"full_attention": build(*full), "sliding_attention": build(*slide)}
    return _Packed(ids, pos, row_q, mask, start)


def _score_packed(
    model, plan: _Head, chunk_size, hp, cache, ac, flat, rows, packed: _Packed, first=None
) -> torch.Tensor:
    """Candidate forward on packed rows, the head on response positions only, sums per candidate. `first`: each
    candidate's first-token log-prob when already scored (FSDP2, see _score_shared_chunked)."""
    cache.batch_select_indices(packed.row_q)
    hc, _, _ = _forward_hidden(
        model,
        plan,
        cache,
        input_ids=packed.ids,
        attention_mask=packed.mask,
        position_ids=packed.pos,
        use_cache=False,
    )
    n_q = hp.shape[0]
    # one table of predicting states: the prompts' last positions, then every packed slot
    table = torch.cat([hp[:, -1], hc.reshape(-1, hc.shape[-1])])
    index, cand = [], []
    group = rows.tolist()
    for i, c in enumerate(flat):
        if not c:
            continue
        skip = 1 if first is not None else 0
        if not skip:
            index.append(group[i])  # token 0 is predicted by the prompt's last position
        if len(c) > 1:
            index.extend(range(n_q + packed.start[i], n_q + packed.start[i] + len(c) - 1))
        cand.extend([i] * (len(c) - skip))
    device = hp.device
    index_t = torch.tensor(index, dtype=torch.long, device=device)
    cand_t = torch.tensor(cand, dtype=torch.long, device=device)
    targets = torch.tensor([t for c in flat for t in c[skip:]], dtype=torch.long, device=device)
    logps = _head_logps(plan, table[index_t], targets, chunk_size, ac)
    sums = logps.new_zeros(len(flat)).index_add(0, cand_t, logps)
    return sums if first is None else first + sums


def _score_naive(
    model,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    device,
    plan: _Head | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids, mask = pad_sequences(seqs, pad_id, left=False)
    ids, mask = ids.to(device), mask.to(device)
    resp = torch.zeros_like(mask)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        resp[i, len(p) : len(p) + len(r)] = 1
    if plan is not None:
        hidden, _, ac = _forward_hidden(model, plan, input_ids=ids, attention_mask=mask)
        sel = resp[:, 1:].bool()  # position j predicts token j+1
        return _masked_sums(_head_logps(plan, hidden[:, :-1][sel], ids[:, 1:][sel], chunk_size, ac), sel)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logps = _token_logps(logits, ids[:, 1:])
    return (logps * resp[:, 1:]).sum(-1)


def to_padded(values: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened per-candidate values -> ([B, K_max] values, [B, K_max] valid mask) for the losses."""
    counts = torch.bincount(group_index, minlength=n_groups)
    k = int(counts.max()) if len(counts) else 0
    slot = torch.arange(len(group_index)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    out = values.new_zeros((n_groups, max(k, 1)))
    valid = torch.zeros((n_groups, max(k, 1)), dtype=torch.bool, device=values.device)
    out = out.index_put((group_index.to(values.device), slot.to(values.device)), values)
    valid[group_index, slot] = True
    return out, valid


def encode_pair(
    tokenizer, prompt: str, response: str, max_response_tokens: int | None = None, end: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """Prompt ids and response ids + `end` (default EOS; a chat format's turn end, see aftune.prompting).
    Tokenised separately so the prompt/response boundary is exact; the prompt gets the tokenizer's special
    tokens (e.g. BOS) exactly as the sampler encodes it."""
    end = [tokenizer.eos_token_id] if end is None else list(end)
    p = encode_prompt(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if max_response_tokens is not None:
        r = r[: max(max_response_tokens - len(end), 0)]
    return p, r + end


@torch.no_grad()
def score_texts(
    model,
    tokenizer,
    groups,
    batch_size: int = 16,
    progress: bool = False,
    max_response_tokens: int | None = None,
    end: list[int] | None = None,
) -> tuple[list[list[float]], list[float]]:
    """Length-normalised scores of every candidate of every Group, and of each group's reference (`end`: the
    ids closing a response, as in encode_pair)."""
    was_training = model.training
    model.eval()
    cand_scores: list[list[float]] = []
    ref_scores: list[float] = []
    for i in tqdm(range(0, len(groups), batch_size), desc="scoring", disable=not progress):
        chunk = groups[i : i + batch_size]
        prompts, cands = [], []
        for g in chunk:
            texts = [c.text for c in g.candidates] + [g.reference]
            enc = [encode_pair(tokenizer, g.prompt, t, max_response_tokens, end) for t in texts]
            prompts.append(enc[0][0])
            cands.append([r for _, r in enc])
        s = score_groups(model, prompts, cands, tokenizer.pad_token_id).mean.tolist()
        for g in chunk:
            n = len(g.candidates)
            cand_scores.append(s[:n])
            ref_scores.append(s[n])
            s = s[n + 1 :]
    model.train(was_training)
    return cand_scores, ref_scores
