"""The chunked LM head and packing stay on under sharding, and stay exact: two gloo processes score their own
questions under FSDP2 (`fully_shard`, the layout accelerate builds) and under DeepSpeed ZeRO-3, and every rank
checks its scores against the unsharded model, and the gathered gradients against the mean of both ranks'
unsharded gradients (what data-parallel averaging gives).

The fast path is shown active, not just equal: the head weight is really sharded (a DTensor shard / a ZeRO-3
partition smaller than the weight), `_find_head` returns a plan, the packed forward runs, the full-logits
function never runs, and no head chunk is wider than chunk_size positions (the [tokens, vocab] logits never exist).
This file is also the worker script: `python tests/test_scoring_sharded.py --worker ENGINE OUT`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ranks import run_ranks

HERE = Path(__file__).resolve().parent
VOCAB, CHUNK = 512, 7


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def _data(rank: int):
    import torch

    g = torch.Generator().manual_seed(10 + rank)
    rnd = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    lens = [(6, (9, 1, 23, 4)), (11, (17, 5)), (3, (3, 30, 2, 8))] if rank == 0 else [(8, (12, 2, 19)), (5, (7,))]
    return [rnd(p) for p, _ in lens], [[rnd(n) for n in cs] for _, cs in lens]


def _loss(scored, n):
    import torch

    return (scored.mean * torch.linspace(-1, 1, n)).sum()


def _reference(world: int):
    """Scores of each rank's data and the rank-mean gradient, on the unsharded model (full logits, padded)."""
    from aftune.scoring import score_groups

    model = _model()
    scores, grads = [], {}
    for r in range(world):
        prompts, cands = _data(r)
        model.zero_grad()
        s = score_groups(model, prompts, cands, 0, chunk_size=0, pack=False)
        (_loss(s, s.mean.numel()) / world).backward()
        scores.append(s.logp_sum.detach())
        for n, p in model.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad
    return scores, grads


def _worker(engine: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    import aftune.scoring as sc

    torch.set_num_threads(1)
    calls = {"token_logps": 0, "packed": 0, "chunk_rows": []}
    real_token, real_packed, real_chunk = sc._token_logps, sc._score_packed, sc._chunk_logps
    sc._token_logps = lambda *a, **k: calls.__setitem__("token_logps", calls["token_logps"] + 1) or real_token(*a, **k)
    sc._score_packed = lambda *a, **k: calls.__setitem__("packed", calls["packed"] + 1) or real_packed(*a, **k)
    sc._chunk_logps = lambda plan, h, *a: calls["chunk_rows"].append(h.shape[0]) or real_chunk(plan, h, *a)

    model = _model()
    if engine.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        for layer in model.model.layers:
            fully_shard(layer)
        if engine == "fsdp2":
            # accelerate's FSDP2 layout (accelerate/utils/fsdp_utils.py): one unit per decoder layer, the
            # embedding, final norm + LM head kept gathered after forward, and the root
            fully_shard(model.model.embed_tokens)
            fully_shard([model.model.norm, model.lm_head], reshard_after_forward=False)
        elif engine == "fsdp2-reshard":  # the head its own unit, resharded after forward: gathered again to score
            fully_shard(model.lm_head, reshard_after_forward=True)
        # fsdp2-root: the head's weight in the root's group
        fully_shard(model)
        run = model
        sharded = type(model.lm_head.weight).__name__ == "DTensor" and model.lm_head.weight.to_local().shape[0] < VOCAB
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
        }
        run, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config
        )
        w = model.lm_head.weight
        sharded = hasattr(w, "ds_id") and w.ds_tensor.numel() < VOCAB * 32
    rank, world = dist.get_rank(), dist.get_world_size()
    plan_found = sc._find_head(run) is not None

    prompts, cands = _data(rank)
    s = sc.score_groups(run, prompts, cands, 0, chunk_size=CHUNK)
    loss = _loss(s, s.mean.numel())
    if engine.startswith("fsdp2"):
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    else:
        from deepspeed.utils import safe_get_full_grad

        run.backward(loss)
        grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}

    seen = {k: (list(v) if isinstance(v, list) else v) for k, v in calls.items()}  # before the reference runs
    ref_scores, ref_grads = _reference(world)
    val_err = (s.logp_sum.detach() - ref_scores[rank]).abs().max().item()
    grad_err = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    head_grad = grads["lm_head.weight"].abs().max().item()
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world": world,
                "sharded": sharded,
                "plan": plan_found,
                "val_err": val_err,
                "grad_err": grad_err,
                "grad_scale": grad_scale,
                "head_grad": head_grad,
                "grad_keys": sorted(grads) == sorted(ref_grads),
                **seen,
            }
        )
    )
    dist.barrier()


def _run_two(engine: str, out: Path) -> list[dict]:
    out.mkdir()
    run_ranks(__file__, ["--worker", engine, str(out)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# the two other FSDP2 layouts (head in the root's group; head resharded after forward, so unshard() runs) are slow:
# the default suite keeps accelerate's layout and ZeRO-3
@pytest.mark.parametrize(
    "engine",
    [
        "fsdp2",
        pytest.param("fsdp2-root", marks=pytest.mark.slow),
        pytest.param("fsdp2-reshard", marks=pytest.mark.slow),
        "zero3",
    ],
)
def test_chunked_head_and_packing_exact_under_sharding(engine, tmp_path):
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    for r in _run_two(engine, tmp_path / engine):
        assert r["world"] == 2 and r["sharded"], r  # the head weight really is split over the ranks
        # the fast path ran: a plan, packed rows, chunks of at most CHUNK positions, never the full logits
        assert r["plan"] and r["packed"] >= 1 and r["token_logps"] == 0, r
        assert r["chunk_rows"] and max(r["chunk_rows"]) <= CHUNK and len(r["chunk_rows"]) > 2, r
        assert r["grad_keys"] and r["head_grad"] > 0 and r["grad_scale"] > 1e-3, r
        # fp32; packed + chunked vs padded + full logits: the tolerances of tests/test_packing.py
        assert r["val_err"] <= 1e-4, r
        assert r["grad_err"] <= 1e-5 + 1e-4 * r["grad_scale"], r


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(HERE))
    _worker(sys.argv[2], sys.argv[3])
