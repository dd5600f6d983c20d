"""Benchmark: one aftune align step vs one TRL DPOTrainer step, same model, same candidates.

Each question has k candidates (prompt --prompt-len tokens, every response --response-len tokens
including EOS); candidates 0..k/2-1 are "better" (rank 0), k/2..k-1 "worse" (rank 1).

* aftune: score_groups (prompt once per question, KV cache shared by its k candidates) -> dpo_loss
  over all k*k/4 (better, worse) pairs with precomputed reference log-probs -> backward -> AdamW.
* TRL: DPOTrainer(precompute_ref_log_probs=True) on the k/2 disjoint pairs (c_i, c_{i+k/2}) per
  question, so each candidate appears in exactly one pair: both sides process the SAME k candidate
  sequences per question once each (TRL re-runs the prompt with each of them). Timed: TRL's own
  `training_step` (its compute_loss, backward) on a batch from its own data collator/dataloader,
  then `optimizer.step()` / `zero_grad()` with the optimizer Trainer creates; aftune uses the same
  optimizer class and kwargs (Trainer.get_optimizer_cls_and_kwargs).

Throughput = candidate (response) tokens per second, B*k*R per step, identical on both sides.
Achieved FLOP/s = 6 * params * tokens actually fed to the model / step time (aftune: B*P + B*k*R,
TRL: B*k*(P+R)), as a fraction of a large torch.mm measured in the same run. Timings are
interleaved (aftune, TRL, aftune, ...) and medians of --runs are reported.

    python bench/bench_align.py --models 3.4m             # k = 2, 4, 8; fp32 and bf16
    python bench/bench_align.py --models 25m --ks 8 --memory --profile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, interleaved, make_tokenizer, matmul_ceiling, median, n_params, run_child, top_ops  # noqa: E402

from aftune.losses import dpo_loss  # noqa: E402
from aftune.scoring import score_groups, to_padded  # noqa: E402


def make_questions(tok, b: int, k: int, p_len: int, r_len: int, seed: int):
    """b questions: prompt text of p_len words, k responses of r_len-1 words + ' </s>'."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = 3, len(tok)
    words = lambda n: " ".join(f"w{i - 3}" for i in torch.randint(lo, hi, (n,), generator=g).tolist())
    return [(words(p_len), [" " + words(r_len - 1) + " </s>" for _ in range(k)]) for _ in range(b)]


class TRLSide:
    def __init__(self, model, tok, questions, k: int, bf16: bool, out_dir: str):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        rows = [
            {"prompt": p, "chosen": cs[i], "rejected": cs[i + k // 2]} for p, cs in questions for i in range(k // 2)
        ]
        args = DPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=len(rows),
            precompute_ref_log_probs=True,
            bf16=bf16,
            use_cpu=True,
            report_to=[],
            max_length=None,
            learning_rate=1e-5,
            beta=0.1,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        os.environ["TQDM_DISABLE"] = "1"
        import datasets

        datasets.disable_progress_bars()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = DPOTrainer(
                model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
            )
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop otherwise
        self.batch = next(iter(self.trainer.get_train_dataloader()))
        ds = self.trainer.train_dataset
        # the exact token ids TRL trains on, regrouped per question for aftune
        self.prompts, self.cands, self.ref = [], [], []
        for q in range(len(questions)):
            r = [ds[q * (k // 2) + i] for i in range(k // 2)]
            self.prompts.append(r[0]["prompt_ids"])
            self.cands.append([x["chosen_ids"] for x in r] + [x["rejected_ids"] for x in r])
            self.ref.append([x["ref_chosen_logps"] for x in r] + [x["ref_rejected_logps"] for x in r])
        self.tokens = int(self.batch["attention_mask"].sum())

    def step(self):
        t = self.trainer
        t.training_step(t.model, self.batch)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)


class AftuneSide:
    def __init__(self, model, trl: TRLSide, k: int, bf16: bool, pad_id: int):
        from transformers import Trainer

        self.model = model.train()
        cls, kw = Trainer.get_optimizer_cls_and_kwargs(trl.trainer.args, model)
        self.opt = cls(model.parameters(), **kw)
        self.prompts, self.cands, self.pad, self.bf16 = trl.prompts, trl.cands, pad_id, bf16
        b = len(self.prompts)
        self.ref = torch.tensor(trl.ref, dtype=torch.float32)
        self.ranks = torch.tensor([[0] * (k // 2) + [1] * (k // 2)] * b)
        self.tokens = sum(len(p) for p in self.prompts) + sum(len(c) for cs in self.cands for c in cs)

    def loss(self):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            s = score_groups(self.model, self.prompts, self.cands, self.pad)
        pol, valid = to_padded(s.logp_sum.float(), s.group_index, len(self.prompts))
        return dpo_loss(pol, self.ref, self.ranks, valid, beta=0.1).mean()

    def step(self):
        self.loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def setup(args, model_name: str, k: int, bf16: bool, tmp: str):
    tok = make_tokenizer()
    base = build_model(model_name, tok)
    questions = make_questions(tok, args.questions, k, args.prompt_len, args.response_len, args.seed)
    trl = TRLSide(copy.deepcopy(base), tok, questions, k, bf16, tmp)
    aft = AftuneSide(copy.deepcopy(base), trl, k, bf16, tok.pad_token_id)
    return base, trl, aft


def check_same_loss(trl: TRLSide, aft: AftuneSide, k: int):
    """Sanity: at the shared initial weights both sides see the same candidates (policy == reference)."""
    with torch.no_grad():
        t = trl.trainer
        t.model.eval()
        s = score_groups(t.model, aft.prompts, aft.cands, aft.pad)
        t.model.train()
    mine = s.logp_sum.view(len(aft.prompts), k)
    return float((mine - aft.ref).abs().max())


def child_memory(args, spec: str) -> dict:
    model_name, side, dtype, k = spec.split(",")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        _, trl, aft = setup(args, model_name, int(k), dtype == "bf16", tmp)
        fn = trl.step if side == "trl" else aft.step
        import gc
        import threading
        import time

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

        fn()  # first step allocates optimizer state; measure the steady-state steps
        gc.collect()
        before, peak, done = rss(), [0.0], []

        def sample():  # current RSS every ms: the peak within the measured steps only
            while not done:
                peak[0] = max(peak[0], rss())
                time.sleep(0.001)

        th = threading.Thread(target=sample)
        th.start()
        for _ in range(2):
            fn()
        done.append(1)
        th.join()
    return {"peak_mb": peak[0] - before}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="3.4m,25m")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast), applied to both sides")
    ap.add_argument("--questions", type=int, default=2, help="questions per step")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=96)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory", action="store_true", help="peak RSS per side at the largest k, child processes")
    ap.add_argument("--profile", action="store_true", help="torch.profiler top ops at the largest k (fp32)")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child_memory(args, args._child)))
        return
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    ks = [int(x) for x in args.ks.split(",")]
    dtypes = args.dtypes.split(",")
    ceil = {"fp32": matmul_ceiling(torch.float32)}
    if "bf16" in dtypes:
        ceil["bf16"] = matmul_ceiling(torch.bfloat16)
    print(
        f"threads={args.threads} B={args.questions} questions/step prompt={args.prompt_len} "
        f"response={args.response_len}; matmul ceiling "
        + ", ".join(f"{d} {c / 1e9:.1f} GFLOP/s" for d, c in ceil.items())
    )
    res = {}
    for m in models:
        for k in ks:
            for d in dtypes:
                with tempfile.TemporaryDirectory() as tmp:
                    base, trl, aft = setup(args, m, k, d == "bf16", tmp)
                    n = n_params(base)
                    diff = check_same_loss(trl, aft, k)
                    times = interleaved({"aftune": aft.step, "trl": trl.step}, args.runs)
                    cand = sum(len(c) for cs in aft.cands for c in cs)
                    row = {}
                    for side, obj in (("aftune", aft), ("trl", trl)):
                        t = median(times[side])
                        row[side] = {
                            "s": t,
                            "cand_tok_s": cand / t,
                            "tokens": obj.tokens,
                            "mfu": 6 * n * obj.tokens / t / ceil[d],
                        }
                    res[(m, k, d)] = row
                    a, b = row["aftune"], row["trl"]
                    print(
                        f"{m} ({n / 1e6:.2f}M) k={k} {d}: aftune {a['s'] * 1e3:.0f} ms "
                        f"({a['cand_tok_s']:.0f} cand tok/s, {a['tokens']} tok, {a['mfu']:.0%} of {d} ceiling) | "
                        f"TRL {b['s'] * 1e3:.0f} ms ({b['cand_tok_s']:.0f} cand tok/s, {b['tokens']} tok, "
                        f"{b['mfu']:.0%}) | ratio {a['cand_tok_s'] / b['cand_tok_s']:.2f}x "
                        f"[ref-logp check {diff:.1e}; runs aftune {[f'{x:.3f}' for x in times['aftune']]} "
                        f"trl {[f'{x:.3f}' for x in times['trl']]}]",
                        flush=True,
                    )
                    if args.profile and k == max(ks) and d == "fp32":
                        print(f"--- profile aftune {m} k={k} fp32\n{top_ops(aft.step)}")
                        print(f"--- profile TRL {m} k={k} fp32\n{top_ops(trl.step)}", flush=True)
                    del base, trl, aft
    mem = {}
    if args.memory:
        k = max(ks)
        for m in models:
            for d in dtypes:
                for side in ("aftune", "trl"):
                    r = run_child(
                        [
                            __file__,
                            "--_child",
                            f"{m},{side},{d},{k}",
                            "--questions",
                            str(args.questions),
                            "--prompt-len",
                            str(args.prompt_len),
                            "--response-len",
                            str(args.response_len),
                            "--threads",
                            str(args.threads),
                        ]
                    )
                    mem[(m, d, side)] = r
                a, b = mem[(m, d, "aftune")], mem[(m, d, "trl")]
                print(
                    f"memory {m} k={k} {d}: step peak RSS growth aftune {a['peak_mb']:.0f} MB, "
                    f"TRL {b['peak_mb']:.0f} MB (sampled RSS above the pre-step level)"
                )
    parts = []
    for m in models:
        p = [
            f"k{k} {res[(m, k, 'fp32')]['aftune']['cand_tok_s'] / res[(m, k, 'fp32')]['trl']['cand_tok_s']:.2f}x"
            for k in ks
            if (m, k, "fp32") in res
        ]
        if "bf16" in dtypes:
            p += [
                f"bf16/TRLfp32 k{k} {res[(m, k, 'bf16')]['aftune']['cand_tok_s'] / res[(m, k, 'fp32')]['trl']['cand_tok_s']:.2f}x"
                for k in ks
                if (m, k, "fp32") in res
            ]
        kk = max(ks)
        if (m, kk, "fp32") in res:
            p.append(
                f"mfu fp32 k{kk} aftune {res[(m, kk, 'fp32')]['aftune']['mfu']:.0%} "
                f"TRL {res[(m, kk, 'fp32')]['trl']['mfu']:.0%}"
            )
        if (m, kk, "bf16") in res:
            p.append(f"bf16 aftune {res[(m, kk, 'bf16')]['aftune']['mfu']:.0%} of bf16 ceiling")
        if (m, "fp32", "aftune") in mem:
            p.append(
                f"mem k{kk} fp32 {mem[(m, 'fp32', 'aftune')]['peak_mb'] / max(mem[(m, 'fp32', 'trl')]['peak_mb'], 1):.2f}x TRL"
            )
        parts.append(f"{m}: " + ", ".join(p))
    print("SUMMARY bench_align aftune/TRL-DPO candidate tok/s (fp32 unless noted): " + " | ".join(parts))


if __name__ == "__main__":
    main()
