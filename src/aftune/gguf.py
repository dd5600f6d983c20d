"""GGUF files as `--model`: converted once to a plain safetensors folder, cached by the file's sha256.

Why: transformers reads a GGUF file by dequantising every tensor in Python (about 3 minutes for a
270M-parameter model on 2 CPU cores), and a GGUF-loaded model refuses `save_pretrained`, so every
command (sft, sample, align, eval, assess, the LoRA merge) would pay that again. The first command
that sees a file converts it - model and tokenizer, dequantised to float32, saved with
`save_pretrained` (safetensors) - and every later one loads the folder in seconds.

Cache layout (root: $AFTUNE_CACHE, else ~/.cache/aftune/gguf):

    <root>/<sha256 of the file>/        config.json, model.safetensors, tokenizer files, aftune-gguf.json
    <root>/<sha256>.lock                held (flock) while converting, so two commands convert once
    <root>/.partial-<sha256[:16]>-<pid>  a conversion in progress; renamed into place when complete

A folder is only ever published by one `os.rename` after everything in it is written, so a kill at any
point leaves either the finished folder or a `.partial-*` that the next conversion removes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from aftune.io import InputError
from aftune.io import file_sha256 as io_sha256

log = logging.getLogger("aftune")

GGUF_MAGIC = b"GGUF"
META = "aftune-gguf.json"
# Bump when the conversion itself changes, so folders written by an older aftune are rebuilt.
FORMAT_VERSION = 2  # 2: the tokenizer keeps the file's add_bos_token / add_eos_token


def is_gguf(name_or_path: str | os.PathLike) -> bool:
    return str(name_or_path).lower().endswith(".gguf")


def cache_root() -> Path:
    env = os.environ.get("AFTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aftune" / "gguf"


def check_file(path: str | os.PathLike) -> Path:
    """The file, or a one-line InputError naming it (missing, a folder, or not GGUF at all)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError("GGUF file does not exist", path, field="--model")
    if not p.is_file():
        raise InputError("expected a .gguf file, found a folder", path, field="--model")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise InputError(f"not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})", path, field="--model")
    return p


_sha_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    # Memoised per process on (path, size, mtime): load_model and load_tokenizer both resolve the file.
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_memo:
        _sha_memo[key] = io_sha256(path)
    return _sha_memo[key]


def cached_folder(path: str | os.PathLike) -> Path:
    """Where the conversion of this file lives (whether or not it exists yet)."""
    return cache_root() / file_sha256(check_file(path))


def _complete(folder: Path) -> bool:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == FORMAT_VERSION


@contextlib.contextmanager
def _lock(lock_path: Path):
    """An exclusive flock, released by the kernel if this process dies (no stale-lock cleanup needed)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; two concurrent conversions then both work, one rename wins
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_gguf(path: Path):
    """(model, tokenizer) straight from the GGUF file through transformers (slow: dequantises everything)."""
    try:
        import gguf  # noqa: F401  transformers needs it; say so in one line instead of its ImportError
    except ImportError:
        raise InputError(
            "reading a .gguf file needs the `gguf` package (pip install 'aftune[real]' or pip install gguf)",
            path,
            field="--model",
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # a truncated or damaged file surfaces as anything from struct to numpy errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"cannot read this GGUF file ({type(e).__name__}: {first[:200]})", path, field="--model"
        ) from None
    _bos_eos_as_the_file_says(tok, path)
    return model, tok


def _bos_eos_as_the_file_says(tok, path: Path) -> None:
    """Apply the file's tokenizer.ggml.add_bos_token / add_eos_token to `tok`. Some transformers releases (5.19)
    drop them when they build the tokenizer from a GGUF file, and Gemma prompts without their BOS are scored and
    sampled as a different (and much worse) distribution."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    for key in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            value = bool(field.parts[field.data[0]][0])
            if getattr(tok, key, None) != value:
                setattr(tok, key, value)


def _to_plain(model):
    """A regular (non-GGUF) model with the same weights, which `save_pretrained` accepts.

    The GGUF-loaded model carries a quantization config / quantizer that makes save_pretrained refuse;
    the weights themselves are already dequantised float tensors, so a fresh model built from the
    config without it takes the state dict unchanged (tied embeddings stay tied: from_config ties them).
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # lm_head.weight may be absent from the GGUF state dict when it is tied to the embeddings
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    bad_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if bad_missing or unexpected:
        raise RuntimeError(
            f"GGUF conversion: state dict mismatch (missing {bad_missing[:5]}, unexpected {unexpected[:5]})"
        )
    plain.generation_config = model.generation_config
    return plain.eval()


def convert(path: Path, out: Path) -> None:
    """Write model + tokenizer of the GGUF file at `path` into the (new) folder `out`."""
    import transformers

    t0 = time.time()
    model, tok = load_gguf(path)
    plain = _to_plain(model)
    del model
    out.mkdir(parents=True)
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    from importlib.metadata import PackageNotFoundError, version

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = None
    meta = {
        "format_version": FORMAT_VERSION,
        "source": str(path.resolve()),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "architecture": type(plain).__name__,
        "n_parameters": sum(p.numel() for p in plain.parameters()),
        "dtype": "float32",
        "transformers": transformers.__version__,
        "gguf": gguf_version,
        "seconds": round(time.time() - t0, 1),
    }
    # written last: its presence (with the right format_version) is what makes a folder complete
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")


def ensure_converted(path: str | os.PathLike, *, quiet: bool = False) -> Path:
    """The cached safetensors folder for this GGUF file, converting it first if needed."""
    p = check_file(path)
    sha = file_sha256(p)
    root = cache_root()
    final = root / sha
    if _complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f"{sha}.lock"):
        if _complete(final):  # another process finished it while this one waited for the lock
            return final
        # Holding the lock, any partial folder for this file belongs to a killed conversion.
        for stale in root.glob(f".partial-{sha[:16]}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete or from an older format: rebuild it
            shutil.rmtree(final)
        if not quiet:
            log.warning(
                "converting %s (sha256 %s...) to safetensors, once, into %s (set AFTUNE_CACHE to put the "
                "cache elsewhere)",
                p,
                sha[:12],
                final,
            )
        tmp = root / f".partial-{sha[:16]}-{os.getpid()}"
        try:
            convert(p, tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def resolve(name_or_path: str) -> str:
    """What the loaders should read: the converted folder for a .gguf path, anything else unchanged."""
    return str(ensure_converted(name_or_path)) if is_gguf(name_or_path) else name_or_path
