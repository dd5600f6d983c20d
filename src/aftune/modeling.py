"""Load any causal LM + tokenizer (local path or hub id), or build the tiny from-scratch demo model.

The demo model is an ordinary Llama-architecture `transformers` model with a BPE tokenizer trained on
the task's own text, saved with `save_pretrained` (safetensors), so every command loads it exactly
like a hub model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from aftune import gguf
from aftune.io import InputError

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
ASSETS = Path(__file__).parent / "assets"
# Models that ship inside the package, by name: `--model arith-base` works offline on any machine.
BUILTIN_MODELS = {
    "arith-base": "the testbed's pretrained base: the tiny Llama after 1,500 steps on 40k 1-2-step arith problems "
    "(recipe: configs/testbed/arith-base.yaml; card: src/aftune/assets/arith-base/README.md)",
}


def resolve_model(name_or_path: str) -> str:
    """The local folder a model name stands for: a built-in model's package folder, a .gguf file's cached
    conversion (aftune.gguf), or the argument itself (a local folder or a hub id)."""
    if name_or_path in BUILTIN_MODELS:
        return str(ASSETS / name_or_path)
    return gguf.resolve(name_or_path)


def _check_local(name_or_path: str) -> None:
    # A path-looking argument that does not exist is a typo, not a hub id: say so instead of a 404.
    if name_or_path in BUILTIN_MODELS:
        if not (ASSETS / name_or_path / "model.safetensors").exists():
            missing = ASSETS / name_or_path
            raise InputError("built-in model missing from the package (reinstall aftune)", missing, field="--model")
        return
    if gguf.is_gguf(name_or_path):  # always a local file (the hub's GGUF repos need gguf_file=, not this)
        gguf.check_file(name_or_path)
        return
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise InputError("model path does not exist", name_or_path, field="--model")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer from a local folder, a hub id, or a .gguf file (via its cached conversion, see aftune.gguf)."""
    _check_local(name_or_path)
    tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code)
    return ensure_pad_token(tok, name_or_path, "--model")


def ensure_pad_token(tok, source: str | None = None, field: str = "processing_class"):
    """Give a tokenizer without a pad token its EOS as the pad token (many hub LMs ship without one), the one
    rule for every way a tokenizer comes in (load_tokenizer, AFTTrainer's processing_class). Padding is masked
    everywhere, so the stand-in never trains or scores as EOS. Neither token: InputError. Returns `tok`."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError(
                "the tokenizer has no pad token and no EOS token to stand in for it; set tokenizer.pad_token",
                source,
                field=field,
            )
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False, device: str | None = None
):
    """Load a causal LM from a local folder, hub id or .gguf file (safetensors weights; no remote code by
    default). A .gguf file is converted once to a cached safetensors folder (aftune.gguf) and read from there."""
    _check_local(name_or_path)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[dtype]
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    if device:
        model.to(device)
    return model


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    _check_local(name_or_path)
    path = resolve_model(name_or_path)  # convert (or find the conversion) once for both
    return load_model(path, dtype, trust_remote_code), load_tokenizer(path, trust_remote_code)


def local_device() -> torch.device:
    """This process's accelerator under a launcher (LOCAL_RANK), else cuda:0 / cpu."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def load_model_checked(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """modeling.load_model_and_tokenizer, with "no such model" (a hub id that is not there or cannot be
    reached, a folder without a usable config.json) as one InputError line instead of a hub traceback."""
    try:
        return load_model_and_tokenizer(name_or_path, dtype, trust_remote_code)
    except InputError:
        raise
    except (OSError, ValueError) as e:  # transformers: OSError if absent, ValueError if not a model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load a model from here ({first})", name_or_path, field="--model") from None


def load_for_inference(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Model + tokenizer on this process's accelerator (sample, eval, assess; training lets Trainer place it)."""
    model, tok = load_model_checked(name_or_path, dtype, trust_remote_code)
    return model.to(local_device()), tok


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over the task's text, digits split one by one (as Llama does).

    Why: a subword vocabulary keeps sequences short (a character-level one made arith solutions ~156
    tokens), while single digits keep arithmetic learnable.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    # Byte-level words, then every digit on its own (a leading space may stay glued to the first one):
    # "Ġ15" -> "Ġ1", "5". Single digits keep arithmetic learnable without a lone-space token per number.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            pre_tokenizers.Split(Regex("Ġ?[0-9]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def build_tiny_model(
    tokenizer,
    hidden_size: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
):
    """A small Llama (about 3M parameters at the defaults) initialised from scratch."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def create_tiny(
    out_dir: str | os.PathLike, texts: list[str], vocab_size: int = 512, seed: int = 0, **model_kw
) -> Path:
    """Train a tokenizer on `texts`, build the tiny model, save both (safetensors) to out_dir."""
    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_tiny_model(tokenizer, seed=seed, **model_kw)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def forward_params(model) -> frozenset[str]:
    """Keyword arguments the underlying model's forward accepts, looking through DDP / peft wrappers
    (which forward **kwargs and so hide the real signature)."""
    import inspect

    inner = model
    for _ in range(4):  # DDP(.module) -> PeftModel(.get_base_model()) -> the HF model
        if hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    return frozenset(inspect.signature(inner.forward).parameters)


def cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (old name removed in 5.40); 4.x knows only the old."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def forward_with_cache(model, cache=None, **inputs):
    """model(...) passing a KV cache under whichever name this transformers version uses; returns (outputs, cache)."""
    if cache is not None:
        inputs[cache_kwarg(model)] = cache
    out = model(**inputs)
    return out, returned_cache(out)
