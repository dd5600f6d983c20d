"""Scaling helpers: process rank / world size, compute-once-and-share, per-rank shards, and LoRA through
peft (an adapter is trained, then merged from disk into a plain model that every command reads).

Everything here is a no-op in a single process. Under `accelerate launch` the process group is set up by
`TrainingArguments` (or `init_process_group` in scripts); these helpers only use `torch.distributed`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from aftune.io import atomic_write_json
from aftune.modeling import load_model, local_device  # noqa: F401 - local_device: callers import it from here


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (e.g. builds a file); the others run it after, when it exists."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def compute_once(path: str | os.PathLike, compute: Callable[[], Any]) -> Any:
    """A JSON value cached at `path`: the main process reads it, or computes it and writes the file (once,
    atomically); every process receives the main process's value by broadcast, so all ranks hold identical
    values and no shared filesystem is needed. An error on the main process is raised on every rank."""
    path = Path(path)
    rank, world = rank_and_world()
    payload: list[Any] = [None]
    if rank == 0:
        try:
            if path.exists():
                value = json.loads(path.read_text())
            else:
                value = compute()
                atomic_write_json(path, value)
            payload = [("ok", value)]
        except Exception as e:
            if world == 1:
                raise
            payload = [("error", f"{type(e).__name__}: {e}")]
            dist.broadcast_object_list(payload, src=0)
            raise
    if world == 1:
        return payload[0][1]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise RuntimeError(f"the main process failed to compute {path.name}: {value}")
    return value


def compute_once_sharded(path: str | os.PathLike, n: int, compute_part: Callable[[list[int]], list]) -> list:
    """A JSON list of n values cached at `path`, each item computed once. Without the file, process r
    computes items r, r+W, r+2W, ... (`compute_part(indices)` -> their values) while the others do theirs;
    the parts are gathered and the main process writes the file. With the file (on the main process), it
    is read and broadcast. Every process returns the same full list; an error on any rank raises on all."""
    path = Path(path)
    rank, world = rank_and_world()
    if world == 1:
        return compute_once(path, lambda: compute_part(list(range(n))))
    cached: list[Any] = [None]
    if rank == 0 and path.exists():
        try:
            cached = [("ok", json.loads(path.read_text()))]
        except Exception as e:
            cached = [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(cached, src=0)
    if cached[0] is not None:
        status, value = cached[0]
        if status == "error":
            raise RuntimeError(f"reading {path} failed on the main process: {value}")
        return value
    try:
        part = ("ok", compute_part(list(range(rank, n, world))))
    except Exception as e:
        part = ("error", f"rank {rank}: {type(e).__name__}: {e}")
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, part)
    errors = [p[1] for p in parts if p[0] == "error"]
    if errors:
        raise RuntimeError(f"computing {path.name} failed: {'; '.join(errors)}")
    values: list[Any] = [None] * n
    for r, (_, vals) in enumerate(parts):
        for i, v in zip(range(r, n, world), vals):
            values[i] = v
    if rank == 0:
        atomic_write_json(path, values)
    return values


def env_shard() -> str:
    """'i/n' from the launcher's RANK / WORLD_SIZE (torchrun, `accelerate launch`), or '' for one process.
    Sharded sampling needs no collectives, so this does not initialise a process group."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return ""
    return f"{rank}/{world}" if world > 1 else ""


# ------------------------------------------------------------------------------------------- LoRA


def lora_config(r: int, alpha: int, targets: list[str]):
    """peft's LoraConfig for a causal LM (no dropout: the exactness tests compare runs step by step)."""
    try:
        from peft import LoraConfig
    except ImportError as e:  # optional extra
        raise ImportError("LoRA needs peft: pip install 'aftune[lora]'") from e
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=[t.strip() for t in targets if t.strip()],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def merge_adapter(
    base_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer=None,
    trust_remote_code: bool = False,
) -> Path:
    """Load the base model, apply the saved adapter, merge it into the weights and save a plain model that
    `aftune eval` / `sample` read. Reads from disk, so it works whatever sharded the training (FSDP, ZeRO-3)."""
    from peft import PeftModel  # optional dependency (the `lora` extra)

    from aftune.training.zero import whole_model_loading

    with whole_model_loading():  # the main process alone: not partitioned under a ZeRO-3 config
        base = load_model(str(base_path), trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
