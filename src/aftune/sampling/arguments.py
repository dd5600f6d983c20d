"""The sampling options, declared once.

`SamplingArguments` (how to draw) and `KSamplingArguments` (+ k samples per question) are mixed into every
command config that samples (sample, assess, iterate, grpo), and `prefixed` derives align's `--resample-*` copy
of the same fields (align's own batch size and lengths are the training's, so its sampling options need a
prefix). `sampling_config` builds the sampler's `SamplingConfig` from any of them, with the tasks' stop strings
and calculator, for every caller (commands, semi-online resampling, GRPO rollouts, greedy evaluation).

Kept free of torch imports: the CLI reads these fields before it loads anything heavy.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any

BACKENDS = ("auto", "hf", "vllm")
BACKEND_HELP = (
    "sampling engine: auto (vLLM where it is installed and the model is large enough to pay for its start-up, "
    "else hf; hf while the model is being trained) | hf (aftune's built-in sampler) | vllm"
)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class SamplingArguments:
    """How each sample is drawn."""

    temperature: float = _opt(0.7, "sampling temperature (0 = greedy)")
    top_p: float = _opt(1.0, "nucleus sampling: draw from the most probable tokens holding this much mass")
    max_new_tokens: int = _opt(256, "max tokens per sample")
    backend: str = _opt("auto", BACKEND_HELP)


@dataclass
class KSamplingArguments(SamplingArguments):
    """... and how many per question."""

    k: int = _opt(8, "samples per question")


def prefixed(cls: type, prefix: str, help_prefix: str, name: str) -> type:
    """A dataclass with `cls`'s fields renamed prefix + name (same types and defaults; help led by help_prefix)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        specs.append((prefix + f.name, hints[f.name], _opt(default, help_prefix + f.metadata.get("help", ""))))
    return make_dataclass(name, specs)


ResampleArguments = prefixed(KSamplingArguments, "resample_", "semi-online: ", "ResampleArguments")
ResampleArguments.__module__ = __name__  # pickled / printed by a name this module has
ResampleArguments.__doc__ = "align's semi-online sampling options: KSamplingArguments' fields as --resample-*."


def sampling_config(tasks, prompt_format, tokenizer, args: Any = None, *, prefix: str = "", **values: Any):
    """The SamplingConfig for sampling `tasks`' prompts in `prompt_format`.

    Fields come from `args` (a config with SamplingArguments' fields, named prefix + field), then `values`
    (k, seed, batch_size, or anything overridden); the stop strings are every task's (in order, once) and the
    calculator is on where any task has one, unless `values` give them."""
    from aftune.prompting import stop_strings
    from aftune.sampling.sampler import SamplingConfig

    got: dict[str, Any] = {}
    if args is not None:
        for f in fields(KSamplingArguments):
            if f.name != "backend" and hasattr(args, prefix + f.name):
                got[f.name] = getattr(args, prefix + f.name)
    got.update(values)
    stop = tuple(dict.fromkeys(s for t in tasks for s in stop_strings(t, prompt_format, tokenizer)))
    return SamplingConfig(**{"stop": stop, "calculator": any(t.calculator for t in tasks), **got})
