"""Whole weights of a sharded policy, for sampling from it while it trains (semi-online resampling, GRPO rollouts).

Under FSDP2 and DeepSpeed ZeRO-3 each rank holds a shard of every weight, and the engine gathers a layer's weights
inside its forward: a collective that every rank must join, the same number of times. Sampling breaks that: rows
end at different steps on different ranks, so the ranks make different numbers of forward calls and the gathers
deadlock; and the unwrapped module called outside the engine computes with shards (ZeRO-3: empty partitions).
So each sampling round gathers the weights once, on every rank together (`full_state_dict`), and the sampler runs
on a plain replica of the model (`SamplingReplica`: built once, refreshed in place each round) that no engine hook
touches. The price is one whole copy of the weights per rank while training runs, which is also what a gather of
all parameters for generation costs. Unsharded models (one process, DDP, ZeRO-1/2) are sampled as they are.
"""

from __future__ import annotations

import torch


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return None
    return DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    """True when some weight lives in shards: an FSDP2 DTensor or a ZeRO-3 partition (`ds_id`)."""
    dtensor = _dtensor_type()
    return any((dtensor is not None and isinstance(p, dtensor)) or hasattr(p, "ds_id") for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of `model`, whole, by name (tied weights once), detached copies. A collective under
    sharding: every rank must call it, at the same point."""
    dtensor = _dtensor_type()
    params = dict(model.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {
        n: (p.full_tensor() if dtensor is not None and isinstance(p, dtensor) else p).detach().clone()
        for n, p in params.items()
    }


def _own_class(model: torch.nn.Module) -> type:
    """fully_shard swaps a module's class for FSDP<cls>(FSDPModule, cls); the replica is built as cls."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    if issubclass(cls, FSDPModule):
        return next(b for b in cls.__mro__[1:] if not issubclass(b, FSDPModule))
    return cls


class SamplingReplica:
    """`replica(model)`: the model to sample from now. `model` itself when no weight is sharded; else a plain
    copy holding the current whole weights (gathered on every rank: call it on all ranks together)."""

    def __init__(self) -> None:
        self.replica: torch.nn.Module | None = None

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        if not is_sharded(model):
            return model
        state = full_state_dict(model)
        if self.replica is None:
            self.replica = self._build(model, state)
        with torch.no_grad():
            own = dict(self.replica.named_parameters())
            if set(own) != set(state):
                raise RuntimeError(f"replica and model disagree on parameters: {sorted(set(own) ^ set(state))[:4]}")
            for name, value in state.items():
                own[name].copy_(value)
        return self.replica

    @staticmethod
    def _build(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        if hasattr(model, "peft_config"):
            raise NotImplementedError("sampling from a sharded LoRA (peft) model is not supported: merge it first")
        # on the meta device first: no second random initialisation of a large model
        device = next(iter(state.values())).device
        with torch.device("meta"):
            replica = _own_class(model)(model.config)
        # to_empty gives each name of a tied weight (embedding / LM head) its own storage: tie them again where the
        # trained model still ties them (its state names one of the two); an engine that untied them (sharding the
        # embedding and the head apart) trains two weights, and the replica keeps two
        first: dict[int, str] = {}
        tied = []
        for name, p in replica.named_parameters(remove_duplicate=False):
            if id(p) in first and name not in state:
                tied.append((name, first[id(p)]))
            first.setdefault(id(p), name)
        replica.to_empty(device=device)
        for name, source in tied:
            owner, _, attr = name.rpartition(".")
            setattr(replica.get_submodule(owner), attr, replica.get_parameter(source))
        with torch.no_grad():
            for name, buf in model.named_buffers():  # buffers are never sharded (rotary frequencies and the like)
                replica.get_buffer(name).copy_(buf)
            for name, p in replica.named_parameters():
                p.data = p.data.to(state[name].dtype)
        if hasattr(model, "generation_config"):
            replica.generation_config = model.generation_config
        return replica.eval().requires_grad_(False)
