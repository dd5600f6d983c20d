"""Peak memory per rank of one align step at a 262,144-token vocabulary, with and without sharding.

Two gloo processes per configuration, each scoring its own question (global batch 2):
* engine: ddp (every rank holds the whole model; DistributedDataParallel), fsdp2 (`fully_shard` in accelerate's
  layout: one unit per decoder layer, the final norm + tied embedding / LM head kept gathered after forward, the
  root), zero3 (DeepSpeed ZeRO stage 3, DS_ACCELERATOR=cpu);
* head: chunked (aftune's default: the LM head applied chunk by chunk to response positions, packed candidates)
  or full (chunk_size=0: [positions, vocab] logits and log-softmax, what sharded models got before).

One step = score_groups over the question's k candidates -> DPO loss over all (better, worse) pairs with
precomputed reference log-probs -> backward -> SGD step (lr 0, no state) -> zero_grad. One warm-up step, then the
measured one. Memory: the C heap in use (glibc mallinfo2, which torch's CPU allocator draws from) polled every
0.5 ms during the step (bench/common.heap_peak_mb): `before` = in use just before the step (weights, gradient
buffers, engine state), `step peak` = the most above that during the step, `total` = their sum. Memory figures do
not depend on the machine's load; times are not reported (the host is shared).

Model: Llama-shaped at Gemma-3-270M's width (hidden 640, 4 heads of 256, 1 KV head, MLP 2048), --layers layers,
tied embeddings, vocab 262,144 (168M of its parameters are the embedding), fp32.

    python bench/bench_sharded_memory.py              # the table (markdown) and bench/out/sharded_memory/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB = 262_144
ENGINES = ("ddp", "fsdp2", "zero3")
HEADS = ("chunked", "full")


def _model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).train()


def _question(args, rank: int):
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    prompt = torch.randint(3, VOCAB, (args.prompt_len,), generator=g).tolist()
    lens = torch.randint(args.min_len, args.max_len + 1, (args.k,), generator=g).tolist()
    return [prompt], [[torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]]


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from common import heap_in_use, heap_peak_mb

    import aftune.scoring as sc
    from aftune.losses import dpo_loss

    torch.set_num_threads(1)
    model = _model(args.layers)
    if args.engine == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True,
        }
        run, opt, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config
        )
    else:
        dist.init_process_group("gloo")
        if args.engine == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard([model.model.norm, model.model.embed_tokens, model.lm_head], reshard_after_forward=False)
            fully_shard(model)
            run = model
        else:
            run = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(run.parameters(), lr=0.0)
    rank = dist.get_rank()
    prompts, cands = _question(args, rank)
    chunk = 0 if args.head == "full" else None
    k = args.k
    ranks = torch.tensor([[0] * (k // 2) + [1] * (k - k // 2)])
    with torch.no_grad():
        ref = sc.score_groups(run, prompts, cands, 0, chunk_size=chunk).logp_sum.view(1, k)
    calls = {"full": 0}
    real = sc._token_logps
    sc._token_logps = lambda *a: calls.__setitem__("full", calls["full"] + 1) or real(*a)

    def step():
        s = sc.score_groups(run, prompts, cands, 0, chunk_size=chunk)
        pol, valid = sc.to_padded(s.logp_sum, s.group_index, 1)
        loss = dpo_loss(pol, ref, ranks, valid, beta=0.1).mean()
        if args.engine == "zero3":
            run.backward(loss)
            run.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up: lazy initialisation, engine buffers
    dist.barrier()
    before = heap_in_use() / 2**20
    peak = heap_peak_mb(step)
    dist.barrier()
    Path(args.out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "before_mib": before,
                "step_peak_mib": peak,
                "full_logits_calls": calls["full"],
                "plan": sc._find_head(run) is not None,
                "tokens": sum(len(c) for c in cands[0]),
            }
        )
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, engine: str, head: str, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    flags = [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("layers", "k", "prompt_len", "min_len", "max_len")
    ]
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--head", head, "--out", str(out), *flags]
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    logs = [p.communicate()[0] for p in procs]
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise RuntimeError(f"{engine}/{head} failed:\n{log[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=ENGINES)
    ap.add_argument("--head", choices=HEADS)
    ap.add_argument("--out", default=str(HERE / "out" / "sharded_memory"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--k", type=int, default=8, help="candidates per question")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--min-len", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--engines", default=",".join(ENGINES))
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    rows = []
    for engine in args.engines.split(","):
        for head in HEADS:
            ranks = _run(args, engine, head, Path(args.out) / f"{engine}-{head}")
            rows.append({"engine": engine, "head": head, "ranks": ranks})
            r = ranks
            print(
                f"| {engine} | {head} | {max(x['before_mib'] for x in r):.0f} | {max(x['step_peak_mib'] for x in r):.0f}"
                f" | {max(x['before_mib'] + x['step_peak_mib'] for x in r):.0f} | {[x['tokens'] for x in r]}"
                f" | {r[0]['plan']} / {sum(x['full_logits_calls'] for x in r)} |",
                flush=True,
            )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
