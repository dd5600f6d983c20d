"""The `aftune` command: one thin command per step. It parses flags / --config and calls the library.

Each command's options are generated from its config dataclass (aftune.config), so flag names, YAML
keys and the saved config can never drift apart.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from aftune import config as C
from aftune.io import InputError, RunError


def _command(name: str) -> Callable:
    """aftune.commands.<name>.run_<name>, imported when the command runs: the commands import torch and
    transformers, which `aftune --help` and a flag error should not wait for."""
    return getattr(importlib.import_module(f"aftune.commands.{name}"), f"run_{name}")


def _click_type(tp: type) -> tuple[Any, bool]:
    """(click type, is_flag) for a config field's base type."""
    return (bool, True) if tp is bool else ({int: int, float: float, str: str}.get(tp, str), False)


def make_command(name: str, cls: type, run: Callable[[Any], Any], help: str) -> click.Command:
    params: list[click.Parameter] = []
    types_ = C.field_types(cls)
    for f in dataclasses.fields(cls):
        flag = C.flag_name(f).replace("_", "-")
        ctype, is_flag = _click_type(types_[f.name][0])
        helptext = f.metadata.get("help", "")
        if is_flag:
            params.append(
                click.Option([f"--{flag}/--no-{flag}", f.name], default=f.default, show_default=True, help=helptext)
            )
        else:
            params.append(
                click.Option([f"--{flag}", f.name], type=ctype, default=f.default, show_default=True, help=helptext)
            )
    params.append(
        click.Option(
            ["--config", "config_file"],
            type=click.Path(),
            default=None,
            help="YAML file whose keys are this command's flag names (flags given on the command line win)",
        )
    )

    def callback(config_file: str | None, **kwargs: Any) -> None:
        ctx = click.get_current_context()
        values = {}
        if config_file:
            values.update(C.load_yaml_config(config_file, cls))
        for key, value in kwargs.items():
            src = ctx.get_parameter_source(key)
            if src is not None and src.name != "DEFAULT" or key not in values:
                values[key] = value
        run(cls(**values))

    return click.Command(name, params=params, callback=callback, help=help, short_help=help.split("\n")[0])


def _summary(d: dict) -> str:
    return json.dumps({k: v for k, v in d.items() if not isinstance(v, (dict, list))}, default=str)


def _sft(cfg: C.SFTConfig) -> None:
    _command("sft")(cfg)


def _sample(cfg: C.SampleConfig) -> None:
    click.echo(_summary(_command("sample")(cfg)))


def _align(cfg: C.AlignConfig) -> None:
    _command("align")(cfg)


def _eval(cfg: C.EvalConfig) -> None:
    click.echo(json.dumps({k: v for k, v in _command("eval")(cfg).items() if k != "assessment"}, default=str))


def _assess(cfg: C.AssessConfig) -> None:
    for name, m in _command("assess")(cfg).items():
        click.echo(f"{name} {_summary(m)}")


def _demo(cfg: C.DemoConfig) -> None:
    _command("demo")(cfg)


def _iterate(cfg: C.IterateConfig) -> None:
    res = _command("iterate")(cfg)
    click.echo(json.dumps({"final_accuracy": res["final_accuracy"], "total": res["total"]}, default=str))


def _grpo(cfg: C.GRPORunConfig) -> None:
    click.echo(_summary(_command("grpo")(cfg)))


def _merge(cfg: C.MergeConfig) -> None:
    click.echo(_summary(_command("merge")(cfg)))


def _export(cfg: C.ExportConfig) -> None:
    click.echo(_summary(_command("export")(cfg)))


def _import(cfg: C.ImportConfig) -> None:
    click.echo(_summary(_command("import_")(cfg)))  # `import` is a keyword: the module is commands/import_.py


@click.command("experiment")
@click.argument("config_file", type=click.Path())
@click.option("--out", default=None, help="output folder (default: the config's `out`)")
@click.option(
    "--seeds",
    default=None,
    help="comma list: run only these of the config's seeds (no results "
    "table; to spread one experiment over processes)",
)
@click.option("--quiet/--no-quiet", default=False, help="no progress bars")
def experiment(config_file: str, out: str | None, seeds: str | None, quiet: bool) -> None:
    """Run a study as resumable runs and write its results table.

    A grid of (method x seed x k x beta x lambda), or, for a config with `arms:`, one align / iterate / grpo
    command per arm, tabulated with its compute (docs/experiments.md, docs/online.md)."""
    only = None
    if seeds is not None:
        try:
            only = tuple(int(s) for s in seeds.split(",") if s.strip())
        except ValueError:
            raise InputError(f"expected a comma list of integers, got {seeds!r}", field="--seeds") from None
    res = _command("experiment")(config_file, out=out, quiet=quiet, seeds=only)
    if res["results"]:
        click.echo(f"results: {res['results']}")


@click.command("tasks")
@click.argument("paths", nargs=-1, type=click.Path())
def tasks_command(paths: tuple[str, ...]) -> None:
    """List built-in tasks and task files, with descriptions.

    One line per task: the value to pass as --task, then its description. PATHS are task files or folders of
    them; a task file that does not parse is listed as INVALID and makes the exit status 1."""
    from aftune.tasks import describe_tasks, format_task_list

    infos = describe_tasks(paths)
    for line in format_task_list(infos):
        click.echo(line)
    if any(t.error for t in infos):  # a broken task file should fail a CI check that lists them
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aftune")
def app() -> None:
    """aftune: Alignment Fine-Tuning (AFT) for chain-of-thought reasoners.

    Pipeline: sft (VFT) -> sample (k candidates per question) -> align (AFT or a baseline) -> eval / assess.
    `aftune demo` runs all of it on the built-in `arith` task on a CPU.
    """


app.add_command(
    make_command(
        "sft",
        C.SFTConfig,
        _sft,
        "VFT: maximum-likelihood fine-tuning on reference solutions (keeps the best checkpoint).",
    )
)
app.add_command(
    make_command(
        "sample",
        C.SampleConfig,
        _sample,
        "Sample k solutions per question, label them, write a resumable candidates JSONL.",
    )
)
app.add_command(
    make_command("align", C.AlignConfig, _align, "AFT (or a baseline) from the VFT model on a candidates file.")
)
app.add_command(
    make_command(
        "eval", C.EvalConfig, _eval, "Greedy-decoding accuracy on a split (+ assessment accuracy on candidates)."
    )
)
app.add_command(
    make_command(
        "assess", C.AssessConfig, _assess, "Assessment diagnostics: can the model tell right reasoning from wrong?"
    )
)
app.add_command(
    make_command(
        "merge",
        C.MergeConfig,
        _merge,
        "Merge `aftune sample --shard i/n` files into one candidates file (every question once).",
    )
)
app.add_command(
    make_command(
        "export",
        C.ExportConfig,
        _export,
        "Candidates as a TRL dataset in Parquet: unpaired (KTOTrainer), pairwise (DPOTrainer), grouped.",
    )
)
app.add_command(
    make_command(
        "import",
        C.ImportConfig,
        _import,
        "A TRL unpaired or preference dataset as a candidates file for `aftune align`.",
    )
)
app.add_command(
    make_command(
        "iterate",
        C.IterateConfig,
        _iterate,
        "Rounds of sample -> align -> eval, each from the last round's model (iterative AFT / RPO).",
    )
)
app.add_command(
    make_command(
        "grpo",
        C.GRPORunConfig,
        _grpo,
        "GRPO through trl.GRPOTrainer with the task's grader as reward, then greedy eval.",
    )
)
app.add_command(experiment)
app.add_command(tasks_command)
app.add_command(
    make_command(
        "demo",
        C.DemoConfig,
        _demo,
        "The whole pipeline on the built-in arith task, with a report (CPU: ~4 min on 2 AVX-512 cores).",
    )
)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (main() runs many times in one process under
    the tests, each with its own captured stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_to_stderr() -> None:
    """The library logs (logger "aftune"); the CLI shows its warnings as `aftune: ...` lines on stderr."""
    log = logging.getLogger("aftune")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("aftune: %(message)s"))
        handler.setLevel(logging.WARNING)
        log.addHandler(handler)


def main() -> None:
    _log_to_stderr()
    try:
        app(standalone_mode=False)
    except InputError as e:
        click.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(2)
    except RunError as e:  # e.g. TrainingDiverged: the user's settings, not a bug; no traceback
        click.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
