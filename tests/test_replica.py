"""Sampling from a sharded policy (semi-online resampling, GRPO rollouts): two gloo processes shard a tiny Llama
under FSDP2 (accelerate's layout) and under DeepSpeed ZeRO-3, and each rank samples its own prompts, with its own
number of decode steps, from `SamplingReplica`. Without the one gather per round the ranks' different numbers of
forward calls would deadlock, and the unwrapped ZeRO-3 module would compute with empty partitions. Checked per rank:
the weights are really sharded, the samples (greedy and seeded) equal the unsharded model's, and after an optimiser
step the replica holds the new whole weights.
This file is also the worker script: `python tests/test_replica.py --worker ENGINE OUT`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ranks import run_ranks

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _prompts(rank: int) -> tuple[list[str], int]:
    # rank 1 decodes more steps than rank 0: forward-call counts differ between the ranks
    return (["12+3=", "a b c"], 6) if rank == 0 else (["7*8=", "xyz", "hello there", "1"], 15)


def _samples(model, tok, prompts, max_new, temperature):
    from aftune.sampling.sampler import SamplingConfig, generate_k

    cfg = SamplingConfig(k=2, max_new_tokens=max_new, temperature=temperature, batch_size=2, seed=3)
    return [
        [s.token_ids for s in g] for g in generate_k(model, tok, prompts, cfg, seeds=[11, 12, 13, 14][: len(prompts)])
    ]


def _worker(engine: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from tiny import char_tokenizer, tiny_llama

    from aftune.training.replica import SamplingReplica, full_state_dict, is_sharded

    torch.set_num_threads(1)
    tok = char_tokenizer()
    model = tiny_llama(tok)
    model.config.tie_word_embeddings = True  # a tied head: the replica must tie it again
    model.lm_head.weight = model.model.embed_tokens.weight
    reference = tiny_llama(tok)
    reference.config.tie_word_embeddings = True
    reference.lm_head.weight = reference.model.embed_tokens.weight
    reference.load_state_dict(model.state_dict())
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)  # the tied embedding / head in the root's group (FSDP2 keeps a shared weight in one)
        run, opt = model, torch.optim.SGD(model.parameters(), lr=0.5)
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
        }
        run, opt, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=config
        )
    rank = dist.get_rank()
    prompts, max_new = _prompts(rank)
    replica = SamplingReplica()
    result = {"sharded": is_sharded(model)}
    for temperature in (0.0, 0.8):
        got = _samples(replica(model), tok, prompts, max_new, temperature)
        result[f"equal_t{temperature}"] = got == _samples(reference, tok, prompts, max_new, temperature)
    before = {n: p.clone() for n, p in replica.replica.named_parameters()}
    # one optimiser step through the engine (each rank its own loss), then a new sampling round
    ids = tok(prompts[0], return_tensors="pt").input_ids
    loss = run(input_ids=ids, labels=ids).loss
    if engine == "fsdp2":
        loss.backward()
        opt.step()
    else:
        run.backward(loss)
        run.step()
    now = replica(model)
    whole = full_state_dict(model)
    result["refreshed"] = all(torch.equal(p, whole[n]) for n, p in now.named_parameters())
    result["moved"] = any(not torch.equal(before[n], p) for n, p in now.named_parameters())
    # tied in the replica exactly where the trained model still ties them
    result["tied"] = (now.lm_head.weight is now.model.embed_tokens.weight) == ("lm_head.weight" not in whole)
    result["same_object"] = now is replica.replica
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sharded_policy_samples_through_its_replica(engine, tmp_path):
    run_ranks(__file__, ["--worker", engine, str(tmp_path)])
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res == {
            "sharded": True,
            "equal_t0.0": True,
            "equal_t0.8": True,
            "refreshed": True,
            "moved": True,
            "tied": True,
            "same_object": True,
        }, (r, res)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3])
