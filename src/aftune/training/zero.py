"""DeepSpeed ZeRO through `transformers.Trainer`: what aftune adds so that the same code trains on GPUs and on
CPU processes.

* `count_deepspeed_processes`: accelerate (1.x) learns the process count of a DeepSpeed run from its own
  distributed backend, which it knows only for accelerator devices. On CPU processes (DeepSpeed's CPU
  accelerator, `DS_ACCELERATOR=cpu`) `PartialState` gets no backend and records one process, rank 0, while
  DeepSpeed has initialised a process group of all of them; the Trainer then fills the DeepSpeed config's batch
  size for one process ("ds train_batch_size=4 vs hf train_batch_size (calculated)=2") and every rank believes
  it is the main one. The fix reads the count, rank and backend from that process group. On a GPU accelerate
  gets them right itself, and this does nothing.
* `weights_digest`: a content hash of a model's weights, gathering ZeRO-3 partitions one parameter at a time.
* `whole_model_loading`: one process loads a model whole while a ZeRO-3 config is active.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch


def deepspeed_launch() -> bool:
    """`accelerate launch` with a DeepSpeed config (it exports ACCELERATE_USE_DEEPSPEED to every process)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def deepspeed_requested(args) -> bool:
    """A DeepSpeed run: a config in the TrainingArguments, or `accelerate launch` with a DeepSpeed config."""
    return bool(getattr(args, "deepspeed", None)) or deepspeed_launch()


def count_deepspeed_processes(state) -> bool:
    """Correct a DeepSpeed `PartialState` that counted one process on CPU (see the module docstring); True when
    it did. A no-op unless DeepSpeed initialised a process group that accelerate did not see."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    if state is None or state.distributed_type != DistributedType.DEEPSPEED or state.backend is not None:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    # PartialState keeps its fields in one dict shared by every instance (and AcceleratorState copies them)
    state.backend = dist.get_backend()
    state.num_processes = dist.get_world_size()
    state.process_index = dist.get_rank()
    state.local_process_index = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return True


def _zero3_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # DeepSpeed's zero.Init / ZeRO-3 engine replace the data by a partition


def weights_digest(model) -> str:
    """sha256 of the model's parameters and buffers (names, dtypes, shapes, values) in a fixed order.

    ZeRO-3 partitioned parameters are gathered one at a time (a collective: every rank must call this), so
    no rank ever holds more than one whole parameter beyond its partition."""
    h = hashlib.sha256()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in sorted(tensors, key=lambda nt: nt[0]):
        if _zero3_partitioned(t):
            import deepspeed  # present whenever a tensor is partitioned

            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                _update(h, name, t)
        else:
            _update(h, name, t)
    return h.hexdigest()


def _update(h, name: str, t: torch.Tensor) -> None:
    data = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
    # raw bytes: bf16 has no numpy dtype, so view any dtype as bytes
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """Load models whole in this process only, even while a ZeRO-3 config is active.

    While TrainingArguments with a ZeRO-3 config are alive, transformers builds every `from_pretrained` model
    under `deepspeed.zero.Init`, which partitions it across processes: a collective. A model loaded by the main
    process alone (merging the LoRA adapter from disk, reading the saved model for greedy accuracy) would wait
    for the others forever. Inside this block the config is unset, and restored after."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its DeepSpeed integration: nothing is partitioned
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)
