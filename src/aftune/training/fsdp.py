"""FSDP2 on CPU processes: accelerate's own FSDP2 code path, selected where accelerate refuses to select it.

`accelerate launch` with `distributed_type: FSDP` exports ACCELERATE_USE_FSDP and the FSDP_* settings to every
process, and `Accelerator` builds its `FullyShardedDataParallelPlugin` from them. But `AcceleratorState` (1.x)
attaches that plugin only on accelerator devices: with `use_cpu` it sets up MULTI_CPU and drops the plugin, so
the run silently becomes DDP. `attach_fsdp_on_cpu` makes the one decision accelerate makes on a GPU (distributed
type FSDP, the plugin attached, its mixed precision set); everything after it is accelerate's own FSDP2 code
(`fully_shard` per decoder layer and for the embedding / final norm + LM head, sharded optimiser states,
FULL_STATE_DICT saving, checkpoints of model and optimiser as full state dicts and their reload into the shards),
the same code a GPU run takes. fully_shard works on a gloo process group with CPU tensors (DTensor shards,
all-gather / reduce-scatter over gloo).

A GPU run never needs this (accelerate attaches the plugin itself there); it is what lets the test suite and any
CPU cluster run FSDP2 honestly rather than DDP under an FSDP config.
"""

from __future__ import annotations

import os


def fsdp_requested() -> bool:
    """FSDP was asked for: by the launcher (`distributed_type: FSDP` in the accelerate config, --use_fsdp), or by
    `TrainingArguments.fsdp` (accelerate sets this variable when it is given a plugin)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def attach_fsdp_on_cpu(accelerator, plugin_args: dict | None = None) -> bool:
    """Attach the FSDP plugin to a CPU multi-process accelerator that dropped it; True when it did.

    plugin_args: the Trainer's `args.fsdp_plugin_args` (from `TrainingArguments.fsdp` / `fsdp_config`), as the
    Trainer passes them to accelerate; without them the plugin is read from the launcher's FSDP_* variables.
    Only FSDP2 (`fsdp_version: 2`): FSDP1's `FullyShardedDataParallel` wrapper is not supported on CPU by this
    path. A no-op in one process, on accelerator devices, and without an FSDP request.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin(**(plugin_args or {}))
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU processes needs fsdp_version: 2 (FSDP2, fully_shard) in the accelerate config")
    # what AcceleratorState.__init__ does for an accelerator device (accelerate/state.py, MULTI_GPU branch)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True
