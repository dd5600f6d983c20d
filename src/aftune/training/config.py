"""AFTConfig: the one configuration of an alignment run, for Python (like TRL's DPOConfig) and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from transformers import TrainingArguments

from aftune.io import InputError
from aftune.training.arguments import AlignmentArguments
from aftune.training.zero import count_deepspeed_processes, deepspeed_requested


@dataclass
class AFTConfig(AlignmentArguments, TrainingArguments):
    """Training arguments of an AFT run: every `transformers.TrainingArguments` field plus the method's.

    Values are checked when the config is made (`InputError`, a `ValueError`, naming the field).
    `remove_unused_columns` defaults to False, and AFTTrainer keeps its columns whatever it says.

    Example:
        >>> from aftune import AFTConfig
        >>> args = AFTConfig(output_dir="out", method="bc", beta=0.5, max_steps=100, learning_rate=1e-5)
        >>> args.method, args.lambda_
        ('bc', 1.0)
        >>> AFTConfig(output_dir="out", method="bc", beta=0)
        Traceback (most recent call last):
        ...
        aftune.io.InputError: field 'beta': must be > 0, got 0
    """

    remove_unused_columns: bool = field(default=False, metadata={"help": "unused: AFTTrainer builds its batches"})
    max_response_tokens: int | None = field(default=256, metadata={"help": "truncate responses to this many tokens"})

    def __post_init__(self):
        if self.use_cpu and deepspeed_requested(self):
            # accelerate sets up plain DDP when asked for the CPU, dropping the DeepSpeed config without a word
            raise InputError(
                "DeepSpeed with use_cpu=True would silently train without DeepSpeed; leave use_cpu off "
                "(on a machine without GPUs, DeepSpeed runs on its CPU accelerator: DS_ACCELERATOR=cpu)",
                field="use_cpu",
            )
        super().__post_init__()
        self.check_alignment()

    @cached_property
    def _setup_devices(self):
        # TrainingArguments sets up the process group here, before it fills the DeepSpeed config's batch sizes
        # from world_size; on CPU processes accelerate counts one process under DeepSpeed (aftune.training.zero)
        device = TrainingArguments._setup_devices.func(self)
        count_deepspeed_processes(self.distributed_state)
        return device
