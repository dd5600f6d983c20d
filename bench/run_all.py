"""Every speed comparison in one run, one table: aftune vs TRL DPOTrainer, vs TRL KTOTrainer, sampler vs `generate`.

Shapes:
* synthetic: the old one (toy 3.4M Llama, 512-token vocabulary, every prompt 64 and every response 96 tokens).
* gsm8k-V: prompt and response lengths drawn from real GSM8K (train split): prompt = aftune's plain
  `Question: ...\\nAnswer:\\n`, response = the reference solution + EOS, both counted with a real tokenizer (the
  Gemma 3 one from aftune's GGUF cache, or --tokenizer; without one, bytes / 4, labelled "approx" in the table).
  The model is Llama-shaped at Gemma-3-270M's width (hidden 640, 4 heads of 256, 1 KV head, MLP 2048, tied
  embeddings, --layers layers), vocabulary V = 32,000 / 152,064 / 262,144. Token ids are random words of a
  word-level tokenizer with V entries (one token per word), so the lengths are exactly the real ones.

Per configuration the two sides are timed interleaved (A, B, A, B, ...), medians of --runs. Reported:
* align: candidate (response) tokens per second of one full optimiser step (forward, backward, AdamW with the
  optimizer class and kwargs the TRL Trainer creates). aftune: score_groups (prompt once, candidates packed) +
  dpo_loss over all k^2/4 (better, worse) pairs, or + alignment_loss on the positive flags for the KTO
  comparison. TRL: DPOTrainer (precompute_ref_log_probs) on the k/2 disjoint pairs of each question, so both
  sides process the same k candidates once each; KTOTrainer (precompute_ref_log_probs) on the same candidates
  as unpaired rows (label = better half).
* sample: new tokens per second; aftune's generate_k vs HF generate(num_return_sequences=k) on CPU, vs vLLM
  (the sampling anchor) with --device cuda. EOS is made to end a row with probability 1/mean-response-length
  per step (a logit hook on both sides), so row lengths have a long tail as real ones do.
* peak memory of one step / one sampling call per tool: torch CPU allocator peak (allocated - freed, from the
  profiler's memory events; exact, unaffected by caching or other processes); for a sampling call, the C heap's
  bytes in use polled every 0.5 ms (glibc mallinfo2; the event log of a whole sampling run outgrows memory);
  torch.cuda max allocated on GPU.
* achieved FLOP/s: 6 * parameters * tokens fed / step time, as a fraction of a large matmul (the ceiling),
  measured at the start and the end of this same run (the larger is used).

    python bench/run_all.py --smoke                  # tiny shapes, seconds: checks the whole pipeline
    python bench/run_all.py                          # the full table (long on a small CPU; see docs/performance.md)
    python bench/run_all.py --plots                  # + docs/figures/perf_*.png (step time / memory vs k, length, vocab)
    python bench/run_all.py --device cuda            # GPU variant: bf16, vLLM as the sampling anchor

Writes bench/out/run_all.md (the markdown table), bench/out/run_all.json (every number) and prints both.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import glob
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import heap_peak_mb, interleaved, make_tokenizer, matmul_ceiling, median, n_params  # noqa: E402

from aftune.losses import alignment_loss, dpo_loss  # noqa: E402
from aftune.scoring import score_groups, to_padded  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
FIGS = ROOT / "docs" / "figures"
REAL_VOCABS = (32000, 152064, 262144)


# --------------------------------------------------------------------------- host and shapes


def host_info(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    for mod in ("transformers", "trl", "vllm"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent optional package
            pass
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags"))
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
        info["cpu_flags"] = [f for f in wanted if f in flags]
        info["cpus"] = os.cpu_count()
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def find_tokenizer(path: str):
    """(tokenizer, label): --tokenizer, else the Gemma 3 tokenizer in aftune's GGUF cache, else None."""
    from transformers import AutoTokenizer

    cands = [path] if path else []
    try:
        from aftune.gguf import cache_root

        cands += sorted(str(Path(p).parent) for p in glob.glob(str(cache_root() / "*" / "tokenizer.json")))
    except Exception:  # noqa: BLE001 - cache module unavailable: fall through to the approximation
        pass
    for c in cands:
        try:
            tok = AutoTokenizer.from_pretrained(c)
            return tok, f"{type(tok).__name__} ({len(tok)} tokens, {Path(c).name[:12]})"
        except Exception:  # noqa: BLE001
            continue
    return None, "approx: UTF-8 bytes / 4 (no tokenizer found)"


def gsm8k_lengths(data: str, tok, n: int, seed: int) -> tuple[list[int], list[int]]:
    """(prompt lengths, response lengths) of n random GSM8K train questions: BOS + prompt, solution + EOS."""
    rows = [json.loads(x) for x in Path(data, "train.jsonl").read_text().splitlines() if x.strip()]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    prompts = [f"Question: {r['question']}\nAnswer:\n" for r in rows]
    answers = [r["answer"] for r in rows]
    if tok is None:
        return [math.ceil(len(p.encode()) / 4) + 1 for p in prompts], [
            math.ceil(len(a.encode()) / 4) + 1 for a in answers
        ]
    p = [len(x) for x in tok(prompts)["input_ids"]]
    r = [len(x) + 1 for x in tok(answers, add_special_tokens=False)["input_ids"]]
    return p, r


def _stats(xs: list[int]) -> str:
    s = sorted(xs)
    return f"mean {sum(s) / len(s):.0f}, p50 {s[len(s) // 2]}, p95 {s[int(0.95 * (len(s) - 1))]}, max {s[-1]}"


class Shape:
    """One benchmark shape: model builder, a word tokenizer of its vocabulary, prompt/response lengths."""

    def __init__(self, name, vocab, arch, p_lens, r_lens, fixed=None):
        self.name, self.vocab, self.arch, self.fixed = name, vocab, arch, fixed
        self.p_lens, self.r_lens = p_lens, r_lens
        self.tok = make_tokenizer(vocab)

    def lengths(self, b: int, k: int, seed: int, scale: float = 1.0):
        if self.fixed:
            return [self.fixed[0]] * b, [[self.fixed[1]] * k for _ in range(b)]
        g = random.Random(seed)
        ps = [g.choice(self.p_lens) for _ in range(b)]
        rs = [[max(2, round(g.choice(self.r_lens) * scale)) for _ in range(k)] for _ in range(b)]
        return ps, rs

    def model(self, seed=0):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        h, layers, heads, kv, head_dim, inter = self.arch
        cfg = LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            intermediate_size=inter,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )
        m = LlamaForCausalLM(cfg)
        m.config.use_cache = False
        return m


def texts(shape: Shape, b: int, k: int, seed: int, scale: float = 1.0):
    """b questions of random words at the shape's lengths; responses end with ' </s>' (EOS, counted)."""
    ps, rs = shape.lengths(b, k, seed, scale)
    g = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(f"w{i - 3}" for i in torch.randint(3, shape.vocab, (n,), generator=g).tolist())  # noqa: E731
    return [(words(p), [" " + words(r - 1) + " </s>" for r in rk]) for p, rk in zip(ps, rs)]


# --------------------------------------------------------------------------- align sides


def _trl_args(cls, out_dir, n_rows, bf16, device, **kw):
    return cls(
        output_dir=out_dir,
        per_device_train_batch_size=n_rows,
        precompute_ref_log_probs=True,
        bf16=bf16,
        use_cpu=device == "cpu",
        report_to=[],
        max_length=None,
        learning_rate=1e-5,
        beta=0.1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **kw,
    )


class TRLSide:
    """One TRL trainer, its own collated batch; step = its training_step + the optimizer it created."""

    def __init__(self, kind, model, tok, questions, k, bf16, device, out_dir):
        import datasets
        from datasets import Dataset

        os.environ["TQDM_DISABLE"] = "1"
        datasets.disable_progress_bars()
        if kind == "dpo":
            from trl import DPOConfig as Cfg
            from trl import DPOTrainer as Trainer

            rows = [
                {"prompt": p, "chosen": cs[i], "rejected": cs[i + k // 2]}
                for p, cs in questions
                for i in range(k // 2)
            ]
        else:
            from trl import KTOConfig as Cfg
            from trl import KTOTrainer as Trainer

            rows = [
                {"prompt": p, "completion": c, "label": i < k // 2} for p, cs in questions for i, c in enumerate(cs)
            ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = Trainer(
                model=model,
                args=_trl_args(Cfg, out_dir, len(rows), bf16, device),
                train_dataset=Dataset.from_list(rows),
                processing_class=tok,
            )
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1
        self.batch = next(iter(self.trainer.get_train_dataloader()))
        masks = [v for key, v in self.batch.items() if key.endswith("attention_mask") and "KL" not in key]
        self.tokens = int(sum(int(m.sum()) for m in masks))  # tokens its forward passes are fed

    def step(self):
        t = self.trainer
        t.training_step(t.model, self.batch)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)


class AftuneSide:
    """score_groups (prompt once per question, candidates packed) -> loss -> backward -> the same optimizer."""

    def __init__(self, kind, model, tok, questions, k, bf16, device, trl_args):
        from transformers import Trainer

        self.model = model.to(device).train()
        self.kind, self.bf16, self.device = kind, bf16, device
        cls, kw = Trainer.get_optimizer_cls_and_kwargs(trl_args, model)
        self.opt = cls(model.parameters(), **kw)
        self.prompts = [tok(p)["input_ids"] for p, _ in questions]
        self.cands = [[tok(c, add_special_tokens=False)["input_ids"] for c in cs] for _, cs in questions]
        b = len(questions)
        g = torch.Generator().manual_seed(1)
        self.ref = -torch.rand((b, k), generator=g) * 50 - 50  # reference log-probs: precomputed, any values
        self.ranks = torch.tensor([[0] * (k // 2) + [1] * (k // 2)] * b, device=device)
        self.ref = self.ref.to(device)
        self.tokens = sum(len(p) for p in self.prompts) + sum(len(c) for cs in self.cands for c in cs)
        self.cand_tokens = sum(len(c) for cs in self.cands for c in cs)

    score_kw: dict = {}  # ablations: pack=False (one padded row per candidate), chunk_size=0 (full logits)

    def step(self):
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            s = score_groups(self.model, self.prompts, self.cands, 0, **self.score_kw)
        b = len(self.prompts)
        if self.kind == "dpo":
            pol, valid = to_padded(s.logp_sum.float(), s.group_index, b)
            loss = dpo_loss(pol, self.ref, self.ranks, valid, beta=0.1).mean()
        else:
            mean, valid = to_padded(s.mean.float(), s.group_index, b)
            loss = alignment_loss(mean, self.ranks == 0, valid).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def peak_mb(fn, device: str, long: bool = False) -> float:
    """Peak memory one call of fn needs above what was allocated before it (MiB).

    CPU: from the profiler's allocation events (exact); long=True (a whole sampling run: millions of
    allocations, whose event log outgrew 22 GB on Gemma-3-270M) polls the C heap instead (common.heap_peak_mb)."""
    if device == "cpu" and long:
        return heap_peak_mb(fn)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_align(args, kind, shape, k, dtype, scale=1.0, memory=True) -> dict:
    bf16 = dtype == "bf16"
    questions = texts(shape, args.questions, k, args.seed, scale)
    base = shape.model()
    with tempfile.TemporaryDirectory() as tmp:
        trl = TRLSide(kind, copy.deepcopy(base).to(args.device), shape.tok, questions, k, bf16, args.device, tmp)
        aft = AftuneSide(kind, copy.deepcopy(base), shape.tok, questions, k, bf16, args.device, trl.trainer.args)
        n = n_params(base)
        del base

        def timed_fn(side):
            def f():
                side.step()
                sync(args.device)

            return f

        times = interleaved({"aftune": timed_fn(aft), "trl": timed_fn(trl)}, args.runs, warmup=1)
        row = {"kind": kind, "shape": shape.name, "k": k, "dtype": dtype, "params": n, "scale": scale}
        row["cand_tokens"] = aft.cand_tokens
        for name, side in (("aftune", aft), ("trl", trl)):
            t = median(times[name])
            row[name] = {"s": t, "runs": times[name], "tok_s": aft.cand_tokens / t, "fed": side.tokens}
            if memory:
                row[name]["peak_mb"] = peak_mb(side.step, args.device)
        row["ratio"] = row["aftune"]["tok_s"] / row["trl"]["tok_s"]
    return row


def run_ablation(args, what, shape, k, dtype) -> dict:
    """aftune against itself with one optimisation off: packing (pack=False) or the chunked head (chunk_size=0)."""
    bf16 = dtype == "bf16"
    questions = texts(shape, args.questions, k, args.seed)
    base = shape.model()
    from transformers import TrainingArguments

    targs = TrainingArguments(
        output_dir=tempfile.gettempdir(), learning_rate=1e-5, use_cpu=args.device == "cpu", report_to=[]
    )
    on = AftuneSide("dpo", copy.deepcopy(base), shape.tok, questions, k, bf16, args.device, targs)
    off = AftuneSide("dpo", copy.deepcopy(base), shape.tok, questions, k, bf16, args.device, targs)
    off.score_kw = {"pack": False} if what == "pack" else {"chunk_size": 0}
    n = n_params(base)
    del base
    times = interleaved(
        {"on": lambda: (on.step(), sync(args.device)), "off": lambda: (off.step(), sync(args.device))}, args.runs
    )
    label = {"pack": "packed vs padded candidates", "head": "chunked head vs full logits"}[what]
    row = {"kind": "ablation", "anchor_name": label, "shape": shape.name, "k": k, "dtype": dtype, "params": n}
    for name, side in (("aftune", on), ("anchor", off)):
        runs = times["on" if name == "aftune" else "off"]
        row[name] = {"s": median(runs), "runs": runs, "tok_s": on.cand_tokens / median(runs)}
        row[name]["peak_mb"] = peak_mb(side.step, args.device)
    row["ratio"] = row["aftune"]["tok_s"] / row["anchor"]["tok_s"]
    return row


# --------------------------------------------------------------------------- sampler


def eos_hook(model, p_stop: float, eos_id: int = 1, pad_id: int = 0):
    """EOS gets probability p_stop at every step (at temperature 1), whatever the model: lengths ~ geometric."""
    logit = math.log(p_stop / (1 - p_stop))

    def hook(_m, _i, out):
        out = out.clone()
        out[..., pad_id] = float("-inf")
        out[..., eos_id] = float("-inf")
        rest = out.float().logsumexp(-1)  # every token but pad and EOS
        out[..., eos_id] = (rest + logit).to(out.dtype)
        return out

    return model.get_output_embeddings().register_forward_hook(hook)


def _new_tokens_generate(out, n_prompt, eos, pad):
    gen = out[:, n_prompt:]
    total = 0
    for row in gen.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in eos:
                n = i + 1
                break
        total += n
    return total


def run_sample(args, shape, k, dtype, real=None) -> dict:
    from aftune.sampling import SamplingConfig, generate_k

    if real is not None:
        # a real model, GSM8K questions; rows end as a fine-tuned model's would (the EOS hook below), unless --no-eos-hook
        model, tok, prompts, max_new, label = real
        mean_r = sum(args.r_lens) / len(args.r_lens)
        hook = None if args.no_eos_hook else eos_hook(model, 1 / mean_r, tok.eos_token_id, tok.pad_token_id)
        if hook is not None:
            label += ", EOS hook"
    else:
        tok = shape.tok
        model = shape.model().eval()
        ps, _ = shape.lengths(args.sample_questions, 1, args.seed + 7)
        prompts = [t[0] for t in texts(shape, args.sample_questions, 1, args.seed + 7)]
        rl = shape.r_lens if not shape.fixed else [shape.fixed[1]]
        mean_r = sum(rl) / len(rl)
        max_new = max(rl) if not shape.fixed else shape.fixed[1]
        if args.smoke:
            max_new = min(max_new, 24)
            mean_r = min(mean_r, 8)
        hook = eos_hook(model, 1 / mean_r)
        label = shape.name
    model.to(args.device)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    cfg = SamplingConfig(k=k, max_new_tokens=max_new, temperature=1.0, batch_size=args.sample_batch, seed=args.seed)
    eos = {tok.eos_token_id} | set(
        [model.generation_config.eos_token_id]
        if isinstance(model.generation_config.eos_token_id, int)
        else (model.generation_config.eos_token_id or [])
    )
    eos.discard(None)
    counts = {}

    def aftune_run():
        res = generate_k(model, tok, prompts, cfg)
        sync(args.device)
        counts["aftune"] = sum(s.n_tokens for r in res for s in r)

    if args.device == "cuda" and args.vllm:
        anchor_name = "vllm"
        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        from aftune.sampling.vllm_backend import generate_k_vllm

        def anchor_run():
            res = generate_k_vllm(folder, prompts, cfg, dtype="bfloat16" if dtype == "bf16" else "float32")
            counts["anchor"] = sum(s.n_tokens for r in res for s in r)

        if hook is not None:
            label += " (vLLM without the EOS hook: natural lengths)"
    else:
        anchor_name = "generate"

        def anchor_run():
            enc = tok(prompts)["input_ids"]
            order = sorted(range(len(prompts)), key=lambda i: len(enc[i]), reverse=True)
            tok.padding_side = "left"
            total = 0
            with torch.inference_mode():
                for s in range(0, len(order), cfg.batch_size):
                    batch = [prompts[i] for i in order[s : s + cfg.batch_size]]
                    inp = tok(batch, return_tensors="pt", padding=True).to(args.device)
                    out = model.generate(
                        **inp,
                        do_sample=True,
                        temperature=1.0,
                        top_p=1.0,
                        # generate's global default is top-k 50 (transformers 5.x applies it when unset): on a
                        # near-flat random model that makes the hooked EOS ~40x likelier and rows end at once
                        top_k=0,
                        num_return_sequences=k,
                        max_new_tokens=max_new,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=sorted(eos),
                    )
                    total += _new_tokens_generate(out, inp["input_ids"].shape[1], eos, tok.pad_token_id)
            sync(args.device)
            counts["anchor"] = total

    with torch.inference_mode():
        times = interleaved({"aftune": aftune_run, "anchor": anchor_run}, args.runs, warmup=1)
    row = {
        "kind": "sample",
        "shape": label,
        "k": k,
        "dtype": dtype,
        "params": n_params(model),
        "anchor_name": anchor_name,
    }
    row["prompts"], row["max_new_tokens"] = len(prompts), max_new
    for name in ("aftune", "anchor"):
        t = median(times[name])
        # token counts differ a little between the sides (independent draws); the rate is per side
        row[name] = {"s": t, "runs": times[name], "new_tokens": counts[name], "tok_s": counts[name] / t}
    row["aftune"]["peak_mb"] = peak_mb(aftune_run, args.device, long=True)
    if anchor_name == "generate":
        row["anchor"]["peak_mb"] = peak_mb(anchor_run, args.device, long=True)
    row["ratio"] = row["aftune"]["tok_s"] / row["anchor"]["tok_s"]
    if hook is not None:
        hook.remove()
    return row


def real_sampler_model(args):
    """Gemma 3 270M from aftune's GGUF cache (a real architecture: sliding windows, tied 262k embedding)."""
    from aftune.gguf import cache_root
    from aftune.modeling import load_model, load_tokenizer

    folders = [Path(p).parent for p in glob.glob(str(cache_root() / "*" / "config.json"))]
    path = args.real_model or (str(folders[0]) if folders else "")
    if not path:
        return None
    tok, model = load_tokenizer(path), load_model(path)
    rows = [json.loads(x) for x in Path(args.gsm8k, "train.jsonl").read_text().splitlines() if x.strip()]
    rows = random.Random(args.seed).sample(rows, 2 if args.smoke else args.sample_questions)
    prompts = [f"Question: {r['question']}\nAnswer:\n" for r in rows]
    max_new = 4 if args.smoke else (args.real_max_new or max(args.r_lens))
    return model.eval(), tok, prompts, max_new, f"Gemma-3-270M ({type(model).__name__}, GSM8K questions)"


# --------------------------------------------------------------------------- output


def ceiling(dtype, device):
    if device == "cuda":
        dt = torch.bfloat16 if dtype == "bf16" else torch.float32
        a = torch.randn(8192, 8192, device="cuda", dtype=dt)
        torch.mm(a, a)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            torch.mm(a, a)
        torch.cuda.synchronize()
        return 10 * 2 * 8192**3 / (time.perf_counter() - t)
    return matmul_ceiling(torch.bfloat16 if dtype == "bf16" else torch.float32)


def table(rows, ceil) -> str:
    head = (
        "| comparison | shape | k | dtype | aftune | anchor | ratio | peak MiB aftune / anchor (x) "
        "| FLOP/s of ceiling aftune / anchor |\n|---|---|---|---|---|---|---|---|---|"
    )
    out = [head]
    for r in rows:
        a, b = r["aftune"], r.get("trl", r.get("anchor"))
        anchor = {"dpo": "TRL DPOTrainer", "kto": "TRL KTOTrainer"}.get(r["kind"], r.get("anchor_name", ""))
        unit = "cand tok/s" if r["kind"] != "sample" else "new tok/s"
        mem = "-"
        if "peak_mb" in a:
            mem = f"{a['peak_mb']:.0f} / " + (
                f"{b['peak_mb']:.0f} ({a['peak_mb'] / max(b['peak_mb'], 1e-9):.2f}x)" if "peak_mb" in b else "-"
            )
        mfu = "-"
        if "fed" in a:
            c = ceil[r["dtype"]]
            mfu = f"{6 * r['params'] * a['fed'] / a['s'] / c:.0%} / {6 * r['params'] * b['fed'] / b['s'] / c:.0%}"
        comp = {"sample": f"sampler vs {anchor}", "ablation": f"aftune {anchor}"}.get(r["kind"], f"align vs {anchor}")
        out.append(
            f"| {comp} | {r['shape']} | {r['k']} | {r['dtype']} | {a['tok_s']:.0f} {unit} | {b['tok_s']:.0f} | "
            f"**{r['ratio']:.2f}x** | {mem} | {mfu} |"
        )
    return "\n".join(out)


def plots(args, shapes, dtype, rows=()) -> list[str]:
    """Step time and peak memory vs k, vs mean response length and vs vocabulary, aftune and TRL DPO.

    A point the table already measured (same kind, shape, k, dtype, length scale) is reused, not rerun."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = args.out_dir / "figures" if args.smoke else FIGS  # smoke plots never land in docs/
    figs.mkdir(parents=True, exist_ok=True)
    real = [s for s in shapes if not s.fixed]
    base = next((s for s in real if s.vocab == args.plot_vocab), real[0])

    def point(shape, k, scale=1.0):
        for r in rows:
            if (r["kind"], r["shape"], r["k"], r["dtype"], r.get("scale")) == ("dpo", shape.name, k, dtype, scale):
                return r
        r = run_align(args, "dpo", shape, k, dtype, scale=scale)
        print(f"plot point {shape.name} k={k} x{scale}: ratio {r['ratio']:.2f}x", flush=True)
        return r

    sweeps = {
        "k": [(k, point(base, k)) for k in args.plot_ks],
        "length": [],
        "vocab": [(s.vocab, point(s, args.plot_k)) for s in real],
    }
    for f in args.plot_scales:
        r = point(base, args.plot_k, f)
        sweeps["length"].append((r["cand_tokens"] / (args.questions * args.plot_k), r))
    files = []
    xlabel = {"k": "candidates per question k", "length": "mean response tokens", "vocab": "vocabulary size"}
    for name, pts in sweeps.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
        xs = [x for x, _ in pts]
        for side, label in (("aftune", "aftune"), ("trl", "TRL DPOTrainer")):
            ax1.plot(xs, [r[side]["s"] for _, r in pts], "o-", label=label)
            ax2.plot(xs, [r[side]["peak_mb"] for _, r in pts], "o-", label=label)
        ax1.set(xlabel=xlabel[name], ylabel="step time (s)", title="step time")
        ax2.set(xlabel=xlabel[name], ylabel="peak MiB", title="peak memory (one step)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
        sub = f"{base.name}" if name != "vocab" else "gsm8k lengths"
        fig.suptitle(f"{dtype}, {args.questions} questions/step, {sub}{' (SMOKE)' if args.smoke else ''}", fontsize=9)
        fig.tight_layout()
        path = figs / f"perf_vs_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    with open(args.out_dir / "plots.json", "w") as f:
        json.dump({k: [(x, r) for x, r in v] for k, v in sweeps.items()}, f, indent=1, default=str)
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and 1 run: checks the pipeline in seconds")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="", help="default fp32,bf16 (cuda: bf16)")
    ap.add_argument("--ks", default="8")
    ap.add_argument("--vocabs", default=",".join(map(str, REAL_VOCABS)))
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the realistic Llama-shaped model")
    ap.add_argument("--questions", type=int, default=2, help="questions per align step")
    ap.add_argument("--sample-questions", type=int, default=32, help="prompts per sampling call")
    ap.add_argument("--sample-batch", type=int, default=16, help="questions per sampling batch (both sides)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    ap.add_argument(
        "--lengths",
        default="",
        help="a JSON file of GSM8K lengths written by --save-lengths (machines without the data or tokenizer)",
    )
    ap.add_argument("--save-lengths", default="", help="write the GSM8K lengths used to this JSON file")
    ap.add_argument(
        "--tokenizer", default="", help="tokenizer folder for the GSM8K lengths (default: Gemma 3 in the GGUF cache)"
    )
    ap.add_argument(
        "--real-model", default="", help="a real model folder for the sampler (default: Gemma 3 in the GGUF cache)"
    )
    ap.add_argument(
        "--real-max-new",
        type=int,
        default=0,
        help="real-model sampler: max new tokens (0: the longest GSM8K response)",
    )
    ap.add_argument(
        "--no-eos-hook", action="store_true", help="real-model sampler: natural lengths (the model's own EOS only)"
    )
    ap.add_argument("--no-real-model", action="store_true")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--no-kto", action="store_true")
    ap.add_argument("--no-align", action="store_true", help="no align rows (DPO / KTO): sampler rows only")
    ap.add_argument("--no-ablations", action="store_true", help="skip aftune packed-vs-padded / chunked-vs-full rows")
    ap.add_argument(
        "--vllm", action=argparse.BooleanOptionalAction, default=True, help="cuda: vLLM as the sampling anchor"
    )
    ap.add_argument("--plots", action="store_true")
    ap.add_argument("--plot-ks", default="2,4,8,16")
    ap.add_argument("--plot-scales", default="0.5,1,2", help="response lengths x these factors")
    ap.add_argument("--plot-k", type=int, default=8)
    ap.add_argument("--plot-vocab", type=int, default=32000)
    ap.add_argument("--out", default="", help="output folder (default bench/out)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = (args.dtypes or ("bf16" if args.device == "cuda" else "fp32,bf16")).split(",")
    ks = [int(x) for x in args.ks.split(",")]
    # --vocabs "": no Llama-shaped rows (e.g. the real-model sampler row only)
    vocabs = [int(x) for x in args.vocabs.split(",") if x]
    if args.plots and not vocabs:
        ap.error("--plots sweeps the Llama-shaped model: give at least one --vocabs")
    args.plot_ks = [int(x) for x in args.plot_ks.split(",")]
    args.plot_scales = [float(x) for x in args.plot_scales.split(",")]
    arch = (640, args.layers, 4, 1, 256, 2048)
    if args.smoke:  # every code path, toy sizes
        args.runs, args.questions, args.sample_questions, args.sample_batch = 1, 2, 6, 2
        args.layers, arch = 1, (64, 1, 2, 1, 32, 128)
        vocabs = [v // 64 for v in vocabs]
        args.plot_ks, args.plot_scales, args.plot_vocab = [2, 4], [0.5, 1], vocabs[0]
        args.real_max_new = 24
    out = Path(args.out) if args.out else OUT
    out.mkdir(parents=True, exist_ok=True)
    args.out_dir = out
    t0 = time.perf_counter()
    info = host_info(args.device)
    ceil0 = {d: ceiling(d, args.device) for d in dtypes}
    print(json.dumps(info), flush=True)

    tok, tok_label = (None, "") if args.lengths else find_tokenizer(args.tokenizer)
    if args.lengths:  # measured elsewhere (scripts/gpu_check.py carries them to a machine without the data)
        saved = json.loads(Path(args.lengths).read_text())
        p_lens, r_lens, src, tok = saved["p_lens"], saved["r_lens"], saved["src"], saved["tokenizer"]
    elif Path(args.gsm8k, "train.jsonl").exists():
        p_lens, r_lens = gsm8k_lengths(args.gsm8k, tok, 2000 if not args.smoke else 200, args.seed)
        src = f"GSM8K train, {tok_label}"
    else:
        g = random.Random(args.seed)  # labelled approximation: no data
        p_lens, r_lens = [g.randint(40, 200) for _ in range(500)], [g.randint(30, 300) for _ in range(500)]
        src = "approx: no GSM8K data found, uniform 40-200 / 30-300"
    if args.save_lengths:
        saved = {"p_lens": p_lens, "r_lens": r_lens, "src": src, "tokenizer": tok_label if tok else None}
        Path(args.save_lengths).write_text(json.dumps(saved))
    if args.smoke:  # keep the real length distribution's shape, at a tenth of the length
        p_lens, r_lens = [max(2, x // 10) for x in p_lens], [max(2, x // 10) for x in r_lens]
    args.p_lens, args.r_lens = p_lens, r_lens
    print(f"lengths from {src}: prompts {_stats(p_lens)}; responses {_stats(r_lens)}", flush=True)
    approx = " (approx lengths)" if tok is None else ""
    shapes = [Shape(f"gsm8k, vocab {v:,}{approx}", v, arch, p_lens, r_lens) for v in vocabs]
    if not args.no_synthetic:
        syn_arch = (256, 4, 4, 4, 64, 600) if not args.smoke else (32, 1, 2, 2, 16, 64)
        fixed = (64, 96) if not args.smoke else (8, 12)
        shapes.append(Shape("synthetic 64/96", 512, syn_arch, [], [], fixed=fixed))

    rows: list[dict] = []
    meta = dict(args=args, info=info, dtypes=dtypes, ceil0=ceil0, src=src, p_lens=p_lens, r_lens=r_lens, t0=t0)

    def add(r: dict, what: str) -> None:
        rows.append(r)
        print(f"{what}: ratio {r['ratio']:.2f}x", flush=True)
        write_outputs(rows, meta, partial=True)  # a long run killed midway keeps every row it finished

    for shape in shapes:
        for k in ks:
            for d in dtypes:
                for kind in () if args.no_align else ("dpo",) + (() if args.no_kto else ("kto",)):
                    add(run_align(args, kind, shape, k, d), f"{kind} {shape.name} k={k} {d}")
                add(run_sample(args, shape, k, d), f"sample {shape.name} k={k} {d}")
                if not shape.fixed and not args.no_ablations:
                    for what in ("pack", "head"):
                        add(run_ablation(args, what, shape, k, d), f"ablation {what} {shape.name} k={k} {d}")
    if not args.no_real_model:
        got = real_sampler_model(args)
        if got is None:
            print("no real model found for the sampler row (--real-model, or convert the Gemma GGUF)", flush=True)
        else:
            for k in ks:
                for d in dtypes:
                    r = run_sample(args, None, 2 if args.smoke else k, d, real=got)
                    add(r, f"sample {r['shape']} k={k} {d}")
    meta["figs"] = plots(args, shapes, dtypes[0], rows) if args.plots else []
    print("\n" + write_outputs(rows, meta, partial=False))


def write_outputs(rows: list[dict], meta: dict, partial: bool) -> str:
    """bench/out/run_all.md and .json from the rows so far; the final write also re-measures the ceiling."""
    args, info, dtypes, ceil0 = meta["args"], meta["info"], meta["dtypes"], meta["ceil0"]
    ceil1 = ceil0 if partial else {d: ceiling(d, args.device) for d in dtypes}
    ceil = {d: max(ceil0[d], ceil1[d]) for d in dtypes}
    wall = time.perf_counter() - meta["t0"]
    cmd = "python bench/run_all.py " + " ".join(sys.argv[1:])
    flags = ", ".join(info.get("cpu_flags", []))
    md = [
        f"<!-- generated by `{cmd.strip()}` on {datetime.date.today()} in {wall / 60:.1f} min -->",
        "**PARTIAL: the run is still going (or was stopped); rows so far.**" if partial else "",
        "**SMOKE RUN: toy shapes, 1 run; the numbers check the pipeline, not speed.**" if args.smoke else "",
        "",
        f"Host: {info.get('cpu')} ({info.get('cpus')} CPUs; flags: {flags or 'none of avx2/avx512/amx'}), "
        f"{info.get('gpu', 'no GPU')}; torch {info['torch']}, transformers {info.get('transformers')}, "
        f"TRL {info.get('trl')}; {info['threads']} threads, device {args.device}.",
        "Matmul ceiling (same run, larger of start / end): "
        + ", ".join(
            f"{d} {c / 1e9:.1f} GFLOP/s (start {ceil0[d] / 1e9:.1f}, end {ceil1[d] / 1e9:.1f})"
            for d, c in ceil.items()
        )
        + ".",
        f"GSM8K lengths: {meta['src']}; prompts {_stats(meta['p_lens'])}; responses {_stats(meta['r_lens'])}. "
        f"Align: {args.questions} questions/step, medians of {args.runs} interleaved runs; "
        f"sampler: {args.sample_questions} prompts, {args.sample_batch} per batch.",
        "",
        table(rows, ceil),
    ]
    if meta.get("figs"):
        md += ["", "Plots: " + ", ".join(f"`{f}`" for f in meta["figs"])]
    text = "\n".join(m for m in md if m is not None) + "\n"
    (args.out_dir / "run_all.md").write_text(text)
    with open(args.out_dir / "run_all.json", "w") as f:
        json.dump(
            {"host": info, "ceiling": ceil, "lengths": meta["src"], "rows": rows, "wall_s": wall, "partial": partial},
            f,
            indent=1,
        )
    return text


if __name__ == "__main__":
    main()
