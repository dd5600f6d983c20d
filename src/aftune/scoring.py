"""Log-likelihood of k candidate responses per question, with the prompt computed once.

`score_groups` runs each question's prompt through the model once, then reuses its KV cache for all
of that question's candidates (rows selected with `batch_select_indices`, so a question with 3
candidates costs 3 rows, not K_max). Gradients flow through the cache back into the prompt, so the
result equals scoring every (prompt + candidate) sequence on its own (see tests/test_scoring.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aftune.modeling import forward_params, forward_with_cache


@dataclass
class Scored:
    logp_sum: torch.Tensor  # [N] summed log-probability of each candidate's response tokens
    n_tokens: torch.Tensor  # [N] number of response tokens
    group_index: torch.Tensor  # [N] which question each candidate belongs to

    @property
    def mean(self) -> torch.Tensor:
        """Length-normalised score s(c) = logp_sum / |c| (0 for an empty response)."""
        return torch.where(self.n_tokens > 0, self.logp_sum / self.n_tokens.clamp(min=1), torch.zeros_like(self.logp_sum))


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), max(width, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), max(width, 1)), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        if left:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    return ids, mask


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # float32 log-softmax even under bf16 autocast: scores differ by hundredths of a nat.
    # (one fused log_softmax kernel measured faster on CPU than gather - logsumexp)
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in forward_params(model)


def score_groups(model, prompts: list[list[int]], candidates: list[list[list[int]]], pad_id: int,
                 share_prefix: bool = True) -> Scored:
    """Score every candidate (token ids) of every question (prompt token ids).

    Returns flattened per-candidate results in question order. With share_prefix=False every
    (prompt + candidate) sequence is run separately (the reference implementation).
    """
    counts = [len(c) for c in candidates]
    flat = [c for cs in candidates for c in cs]
    device = next(model.parameters()).device
    group_index = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(counts, dtype=torch.long))
    n_tokens = torch.tensor([len(c) for c in flat], dtype=torch.long, device=device)
    if not flat:
        z = torch.zeros(0, device=device)
        return Scored(z, n_tokens, group_index)
    if not share_prefix:
        return Scored(_score_naive(model, [prompts[g] for g in group_index.tolist()], flat, pad_id, device),
                      n_tokens, group_index)

    keep = [i for i, c in enumerate(counts) if c > 0]  # questions without candidates cost nothing
    p_ids, p_mask = _pad([prompts[i] for i in keep], pad_id, left=True)
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    # only the last prompt position's logits are needed (they predict each candidate's first token)
    kw = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    out, cache = forward_with_cache(model, input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos,
                                    use_cache=True, **kw)
    rows = torch.repeat_interleave(torch.arange(len(keep), device=device),
                                   torch.tensor([counts[i] for i in keep], device=device))
    cache.batch_select_indices(rows)  # each question's prompt state, once per candidate; differentiable

    c_ids, c_mask = _pad(flat, pad_id, left=False)
    c_ids, c_mask = c_ids.to(device), c_mask.to(device)
    first = _token_logps(out.logits[:, -1][rows], c_ids[:, 0]) * c_mask[:, 0]
    attn = torch.cat([p_mask[rows], c_mask], dim=1)
    pos = p_mask.sum(-1)[rows].unsqueeze(1) + torch.arange(c_ids.shape[1], device=device)
    if c_ids.shape[1] > 1:
        # the last position predicts nothing: no LM head there
        kw = {"logits_to_keep": slice(0, -1)} if kw else {}
        out2, _ = forward_with_cache(model, cache, input_ids=c_ids, attention_mask=attn, position_ids=pos,
                                     use_cache=False, **kw)
        logits = out2.logits if kw else out2.logits[:, :-1]
        rest = (_token_logps(logits, c_ids[:, 1:]) * c_mask[:, 1:]).sum(-1)
    else:
        rest = torch.zeros_like(first)
    return Scored(first + rest, n_tokens, group_index)


def _score_naive(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> torch.Tensor:
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids, mask = _pad(seqs, pad_id, left=False)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logps = _token_logps(logits, ids[:, 1:])
    resp = torch.zeros_like(mask)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        resp[i, len(p):len(p) + len(r)] = 1
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


def encode_pair(tokenizer, prompt: str, response: str, max_response_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Prompt ids and response ids (+ EOS). Tokenised separately so the prompt/response boundary is exact;
    the prompt gets the tokenizer's special tokens (e.g. BOS) exactly as the sampler encodes it."""
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if max_response_tokens is not None:
        r = r[:max_response_tokens - 1]
    return p, r + [tokenizer.eos_token_id]


@torch.no_grad()
def score_texts(model, tokenizer, groups, batch_size: int = 16, progress: bool = False,
                max_response_tokens: int | None = None) -> tuple[list[list[float]], list[float]]:
    """Length-normalised scores of every candidate of every Group, and of each group's reference."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    cand_scores: list[list[float]] = []
    ref_scores: list[float] = []
    for i in tqdm(range(0, len(groups), batch_size), desc="scoring", disable=not progress):
        chunk = groups[i:i + batch_size]
        prompts, cands = [], []
        for g in chunk:
            texts = [c.text for c in g.candidates] + [g.reference]
            enc = [encode_pair(tokenizer, g.prompt, t, max_response_tokens) for t in texts]
            prompts.append(enc[0][0])
            cands.append([r for _, r in enc])
        s = score_groups(model, prompts, cands, tokenizer.pad_token_id).mean.tolist()
        for g in chunk:
            n = len(g.candidates)
            cand_scores.append(s[:n])
            ref_scores.append(s[n])
            s = s[n + 1:]
    model.train(was_training)
    return cand_scores, ref_scores
