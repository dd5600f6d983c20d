"""`aftune export`: candidates files as a TRL dataset (unpaired for KTOTrainer, pairwise for DPOTrainer, or
aftune's grouped records) in Parquet, with a meta.json and README.md saying where it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aftune.config import ExportConfig
from aftune.interop import FORMATS, export_groups
from aftune.io import InputError
from aftune.records import read_groups


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Read every --candidates file (comma separated), write OUT/train.parquet, OUT/meta.json, OUT/README.md."""
    if cfg.format not in FORMATS:
        raise InputError(f"expected {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, got {cfg.format!r}", field="--format")
    if cfg.max_pairs_per_question is not None:
        if cfg.format != "pairwise":
            raise InputError("only the pairwise format has pairs to cap", field="--max-pairs-per-question")
        if cfg.max_pairs_per_question < 1:
            raise InputError(f"must be >= 1, got {cfg.max_pairs_per_question}", field="--max-pairs-per-question")
    paths = [p.strip() for p in cfg.candidates.split(",") if p.strip()]
    if not paths:
        raise InputError("give one or more candidates files, comma separated", field="--candidates")
    sources = {}
    for p in paths:  # every file is read and checked before anything is written
        groups = read_groups(p)
        if not groups:
            raise InputError("no candidate groups (empty file)", p)
        sources[p] = groups
    meta = export_groups(
        sources,
        cfg.format,
        cfg.out,
        max_pairs=cfg.max_pairs_per_question,
        seed=cfg.seed,
        include_reference=cfg.include_reference,
    )
    return {**meta, "out": str(Path(cfg.out) / meta["data_file"])}
