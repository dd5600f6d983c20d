"""The sampling options declared once (aftune.sampling.arguments) and the engine of sampling from a model that is
being trained (`align --resample-backend`, `grpo --backend`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import TASK_ARGS, cli

from aftune import config as C
from aftune.cli import make_command
from aftune.io import InputError
from aftune.prompting import PLAIN
from aftune.sampling.arguments import KSamplingArguments, ResampleArguments, SamplingArguments, sampling_config
from aftune.sampling.engines import resolve_training_backend
from aftune.tasks import get_tasks

SAMPLING = {"k": 8, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 256, "backend": "auto"}


def _flags(cls) -> dict[str, object]:
    cmd = make_command("x", cls, lambda c: None, "")
    return {opt: p.default for p in cmd.params for opt in p.opts}


@pytest.mark.parametrize(
    ("cls", "base", "prefix", "batch_flag"),
    [
        (C.SampleConfig, KSamplingArguments, "", "--batch-size"),
        (C.AssessConfig, KSamplingArguments, "", "--batch-size"),
        (C.IterateConfig, KSamplingArguments, "", "--sample-batch-size"),
        (C.AlignConfig, ResampleArguments, "resample-", "--resample-batch-size"),
        (C.GRPORunConfig, SamplingArguments, "", "--batch-size"),
    ],
)
def test_every_sampling_command_takes_the_one_declaration(cls, base, prefix, batch_flag):
    """The historic flag names, with the declaration's defaults, come from the mixin (align's with its prefix)."""
    assert issubclass(cls, base)
    flags = _flags(cls)
    want = {f.name.removeprefix("resample_") for f in dataclasses.fields(base)}
    for name in want:
        flag = "--" + prefix + name.replace("_", "-")
        assert flags[flag] == SAMPLING[name], flag
    assert batch_flag in flags
    if cls is C.GRPORunConfig:
        assert "--k" not in flags and "--num-generations" in flags  # GRPO's group size keeps its own name
    if cls is C.IterateConfig:  # iterate also carries align's semi-online options
        assert "--resample-backend" in flags and "--backend" in flags


def test_sampling_config_is_built_from_any_command_config():
    from aftune.modeling import load_tokenizer

    tok = load_tokenizer("arith-base")
    (task,) = get_tasks("arith", {}, None)
    sample = C.SampleConfig(k=3, temperature=0.5, top_p=0.9, max_new_tokens=7, batch_size=5, seed=2)
    s = sampling_config([task], PLAIN, tok, sample, seed=sample.seed, batch_size=sample.batch_size)
    assert (s.k, s.temperature, s.top_p, s.max_new_tokens, s.batch_size, s.seed) == (3, 0.5, 0.9, 7, 5, 2)
    assert s.stop == tuple(task.stop) and s.calculator is task.calculator is True

    align = C.AlignConfig(resample_k=4, resample_temperature=0.3, resample_top_p=0.8, resample_max_new_tokens=9)
    a = sampling_config([task], PLAIN, tok, align, prefix="resample_", seed=1, batch_size=2)
    assert (a.k, a.temperature, a.top_p, a.max_new_tokens, a.batch_size) == (4, 0.3, 0.8, 9, 2)

    grpo = C.GRPORunConfig(temperature=1.1, max_new_tokens=11)
    g = sampling_config([], None, tok, grpo, k=6, stop=("X",), calculator=False, seed=0, batch_size=1)
    assert (g.k, g.temperature, g.max_new_tokens, g.stop, g.calculator) == (6, 1.1, 11, ("X",), False)

    greedy = sampling_config([task, task], PLAIN, tok, k=1, temperature=0.0, max_new_tokens=4)
    assert greedy.stop == tuple(task.stop)  # each task's stop strings once, in order


def test_training_backend_auto_is_the_builtin_sampler(monkeypatch):
    from aftune.sampling import vllm_backend

    assert resolve_training_backend("auto") == resolve_training_backend("hf") == "hf"
    with pytest.raises(InputError) as e:
        resolve_training_backend("tgi", field="--resample-backend")
    assert e.value.field == "--resample-backend"
    monkeypatch.setattr(vllm_backend, "reload_unsupported", lambda: None)  # as on a CUDA machine with vLLM
    assert resolve_training_backend("vllm") == "vllm"
    with pytest.raises(InputError, match="LoRA"):
        resolve_training_backend("vllm", lora=True)


def test_vllm_refused_where_weights_cannot_be_reloaded(monkeypatch):
    import torch

    from aftune.sampling import vllm_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm_backend, "available", lambda: True)  # vLLM's CPU build installed
    with pytest.raises(InputError) as e:
        resolve_training_backend("vllm", field="--resample-backend")
    msg = str(e.value)
    assert e.value.field == "--resample-backend" and "\n" not in msg
    assert "CPU build" in msg and "weight_loader" in msg and "--resample-backend hf" in msg


def test_align_and_grpo_refuse_vllm_on_this_machine_before_loading_anything(tmp_path):
    from aftune.sampling import vllm_backend

    if vllm_backend.reload_unsupported() is None:
        pytest.skip("this machine's vLLM can reload weights")
    r = cli(
        "align", "--model", tmp_path / "none", "--candidates", tmp_path / "none.jsonl", "--task-args", TASK_ARGS,
        "--resample-every", "2", "--resample-backend", "vllm", "--out", tmp_path / "a", "--quiet",
    )  # fmt: skip
    assert r.code == 2 and "--resample-backend" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "a").exists()
    pytest.importorskip("trl")
    r = cli("grpo", "--model", tmp_path / "none", "--backend", "vllm", "--out", tmp_path / "g", "--quiet")
    assert r.code == 2 and "--backend" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("grpo", "--model", tmp_path / "none", "--backend", "vllm", "--rollout", "trl", "--out", tmp_path / "g")
    assert r.code == 2 and "--rollout aftune" in r.stderr
    assert not (tmp_path / "g").exists()


def test_grpo_rollout_engine():
    from aftune.commands.grpo import rollout_engine

    arith = get_tasks("arith", {}, None)
    assert rollout_engine(C.GRPORunConfig(), arith) == "hf"  # the calculator: aftune's rollouts, built-in sampler
    assert rollout_engine(C.GRPORunConfig(rollout="trl"), arith) == "trl"


class _Engine:
    """A stand-in for VLLMEngine: records the weight loads and samples with the built-in sampler on the weights it
    was last given (what the real engine does with its own kernels)."""

    def __init__(self, tok):
        self.tok, self.calls, self.model = tok, [], None

    def load_weights(self, model):
        self.calls.append("load")
        self.model = model

    def generate(self, prompts, cfg, seeds=None, **kw):
        from aftune.sampling.sampler import generate_k

        self.calls.append("generate")
        return generate_k(self.model, self.tok, prompts, cfg, seeds=seeds)


def test_rollouts_and_resampling_load_the_weights_then_draw_what_the_builtin_sampler_draws(tiny_model, candidates):
    """With an engine, each rollout / resampling loads the current weights first and passes per-question seeds, so
    it draws exactly what the built-in sampler draws on the live model."""
    from test_online import _FakeTrainer

    from aftune.commands.common import load_for_inference
    from aftune.commands.grpo import SamplerRollout
    from aftune.records import read_groups
    from aftune.sampling.sampler import SamplingConfig
    from aftune.training.data import AlignDataset, NLLDataset
    from aftune.training.online import ResampleCallback

    model, tok = load_for_inference(str(tiny_model))
    cfg = C.GRPORunConfig(max_new_tokens=12, temperature=1.0)
    prompts = ["Question: a?\nAnswer:\n"] * 3 + ["Question: b?\nAnswer:\n"] * 3
    eng = _Engine(tok)
    via = SamplerRollout(tok, cfg, ("\nQuestion:",), True, engine=eng)(prompts, _FakeTrainer(model))
    direct = SamplerRollout(tok, cfg, ("\nQuestion:",), True)(prompts, _FakeTrainer(model))
    assert eng.calls == ["load", "generate"] and eng.model is model
    assert via["completion_ids"] == direct["completion_ids"] and via["logprobs"] == direct["logprobs"]

    groups = read_groups(candidates)[:4]
    (task,) = get_tasks("arith", C.parse_task_args(TASK_ARGS), None)
    examples = {(task.name, e.id): (task, e) for e in task.load("train")}
    nll = NLLDataset.from_texts(tok, [("q", "a")], 32)
    ds = AlignDataset(tok, groups, nll, max_candidates=4)
    sc = SamplingConfig(k=3, max_new_tokens=12, temperature=1.0, batch_size=2, stop=tuple(task.stop))
    eng = _Engine(tok)
    a = ResampleCallback(tok, ds, examples, 2, sc, candidates.parent / "r", 4, True, None, 0, engine=eng).sample(
        model, 2
    )
    b = ResampleCallback(tok, ds, examples, 2, sc, candidates.parent / "r", 4, True, None, 0).sample(model, 2)
    assert eng.calls == ["load", "generate"]
    assert [[c.text for c in g.candidates] for g in a] == [[c.text for c in g.candidates] for g in b]


def test_semi_online_run_says_which_engine_sampled(tiny_model, candidates, tmp_path):
    r = cli(
        "align", "--model", tiny_model, "--candidates", candidates, "--task-args", TASK_ARGS, "--quiet",
        "--method", "bc", "--max-steps", "3", "--save-steps", "3", "--batch-size", "2", "--resample-every", "2",
        "--resample-k", "3", "--resample-max-new-tokens", "16", "--out", tmp_path / "o",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["resample_backend"] == "hf" and [x["step"] for x in m["resamples"]] == [2]
