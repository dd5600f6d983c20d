"""`aftune merge`: the shard files of `aftune sample --shard i/n` into one candidates file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aftune.config import MergeConfig
from aftune.io import InputError
from aftune.sampling.shards import merge_shards, shard_file


def run_merge(cfg: MergeConfig) -> dict[str, Any]:
    """Either --shards N (merge OUT.shard{i}ofN.jsonl, i < N, into OUT) or --inputs a,b,c."""
    if bool(cfg.shards) == bool(cfg.inputs.strip()):
        raise InputError("give either --shards N or --inputs a,b,c", field="--shards")
    if cfg.shards < 0:
        raise InputError(f"must be >= 1, got {cfg.shards}", field="--shards")
    paths = (
        [shard_file(cfg.out, i, cfg.shards) for i in range(cfg.shards)]
        if cfg.shards
        else [Path(p.strip()) for p in cfg.inputs.split(",") if p.strip()]
    )
    return merge_shards(paths, cfg.out)
