"""Prompt formats: plain prompts, chat templates (rendered user turn + generation prompt, the response scored as
the assistant turn), an exact prompt/response token boundary, and the format recorded and checked per file."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE, TINY, cli
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from aftune.io import InputError
from aftune.prompting import PLAIN, PromptFormat, encode_prompt, resolve_prompt_format, stop_strings
from aftune.scoring import encode_pair
from aftune.tasks import get_task

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<eot>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def _tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per character, plus <bos> (added to every plain encoding, as Llama / Gemma do) and <eot>."""
    vocab = {"<pad>": 0, "</s>": 1, "<bos>": 2, "<eot>": 3, "<unk>": 4}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789 +-=#.:?<>*[]\n":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<eot>"],
    )
    fast.chat_template = template
    return fast


def test_resolve_auto_none_and_file(tmp_path):
    assert resolve_prompt_format("auto", _tokenizer()) == PromptFormat("chat")
    assert resolve_prompt_format("auto", _tokenizer(None)) is PLAIN  # a base model without a template
    assert resolve_prompt_format("none", _tokenizer()) is PLAIN
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert resolve_prompt_format(str(path), _tokenizer(None)) == PromptFormat("chat", TEMPLATE)
    with pytest.raises(InputError, match="field '--chat-template': expected auto, none or a chat template file"):
        resolve_prompt_format(str(tmp_path / "missing.jinja"), _tokenizer())


def test_chat_prompt_is_the_user_turn_with_the_generation_prompt():
    tok, fmt = _tokenizer(), PromptFormat("chat")
    text = fmt.render(tok, "Question: 2+3?\nAnswer:\n")
    assert text == "<bos>[user]Question: 2+3?\nAnswer:<eot>\n[assistant]"
    ids = encode_prompt(tok, text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # not doubled
    assert encode_prompt(tok, "abc")[0] == tok.bos_token_id  # a plain prompt still gets its BOS
    assert fmt.turn_end(tok) == "<eot>" and fmt.response_end(tok) == [3]
    assert PLAIN.response_end(tok) == [tok.eos_token_id] and PLAIN.render(tok, "x") == "x"
    task = get_task("arith", n_train=4, n_validation=2, n_test=2)
    assert stop_strings(task, fmt, tok) == ("\nQuestion:", "<eot>") and stop_strings(task, PLAIN, tok) == task.stop


def test_prompt_response_boundary_is_exact():
    """Prompt ids + response ids == the tokens of the whole conversation as the template renders it."""
    tok, fmt = _tokenizer(), PromptFormat("chat")
    prompt, response = "Question: 2+3?\nAnswer:\n", "2+3=5\n#### 5"
    p, r = encode_pair(tok, fmt.render(tok, prompt), response, end=fmt.response_end(tok))
    full = tok.apply_chat_template(
        [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": response}], tokenize=False
    )
    assert p + r == tok(full.rstrip(), add_special_tokens=False)["input_ids"]
    # truncation keeps the turn end
    _, short = encode_pair(tok, fmt.render(tok, prompt), response, max_response_tokens=4, end=fmt.response_end(tok))
    assert len(short) == 4 and short[-1] == 3


def test_meta_records_the_format():
    tok = _tokenizer()
    assert PLAIN.to_meta(tok) == {"kind": "plain"}
    a, b = PromptFormat("chat").to_meta(tok), PromptFormat("chat", TEMPLATE + " ").to_meta(tok)
    assert a["kind"] == "chat" and a != b  # another template is another format


def test_chat_template_through_the_pipeline(tmp_path):
    """sft -> sample -> align -> eval with a template file on the tiny model; align refuses another format."""
    tpl = tmp_path / "chat.jinja"
    tpl.write_text(TEMPLATE)
    ct = ["--chat-template", str(tpl)]
    assert cli("sft", *TINY, "--max-steps", "2", "--eval-steps", "2", "--out", tmp_path / "sft", *ct).code == 0
    model = tmp_path / "sft" / "model"
    cands = tmp_path / "c.jsonl"
    r = cli("sample", "--model", model, "--out", cands, *SAMPLE, *ct)
    assert r.code == 0, r.stderr
    meta = json.loads((tmp_path / "c.jsonl.meta.json").read_text())
    assert meta["prompt_format"]["kind"] == "chat" and "<eot>" in meta["sampling"]["stop"]
    r = cli("sample", "--model", model, "--out", cands, *SAMPLE, "--chat-template", "none")  # resume, other format
    assert r.code == 2 and "field 'prompt_format'" in r.error_lines[0]
    group = json.loads(cands.read_text().splitlines()[0])
    assert group["prompt"].startswith("[user]Question:") and group["prompt"].endswith("[assistant]")
    # the user turn is kept as a message too, so `aftune export` writes TRL's conversational format
    assert group["meta"]["messages"][0]["role"] == "user" and group["meta"]["messages"][0]["content"].startswith(
        "Question:"
    )
    align = [
        "align",
        "--model",
        model,
        "--candidates",
        cands,
        "--task-args",
        "n_train=200",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--quiet",
    ]
    r = cli(*align, "--out", tmp_path / "plain", "--chat-template", "none")
    assert r.code == 2 and len(r.error_lines) == 1
    assert r.error_lines[0].startswith(
        f"error: {tmp_path / 'c.jsonl.meta.json'}: field 'prompt_format': these "
        "candidates were sampled with prompt format {'kind': 'chat', "
    ), r.error_lines
    assert r.error_lines[0].endswith(
        "but this run uses {'kind': 'plain'}; pass the same --chat-template as `aftune sample`"
    )
    assert not (tmp_path / "plain").exists()
    assert cli(*align, "--out", tmp_path / "bc", *ct).code == 0
    r = cli(
        "eval",
        "--model",
        tmp_path / "bc" / "model",
        "--task-args",
        "n_train=200,n_test=4",
        "--max-new-tokens",
        "8",
        "--out",
        tmp_path / "e.json",
        "--quiet",
        *ct,
    )
    assert r.code == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "e.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("<eot>" not in row["completion"] for row in rows)


BAD_TEMPLATES = {
    # (template text, the message after "FILE: ")
    "syntax": (
        "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}",
        "line 2: field '--chat-template': the chat template is not valid Jinja (unexpected '}')",
    ),
    "sandbox": (
        "{{ ''.__class__.__mro__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "field '--chat-template': the chat template was refused by the Jinja sandbox (access to attribute "
        "'__class__' of 'str' object is unsafe.)",
    ),
    "raises": (
        "{{ raise_exception('roles must alternate') }}",
        "field '--chat-template': the chat template failed to render (TemplateError: roles must alternate)",
    ),
    "undefined": (
        "{{ messages[0].content.upper }}{{ nothing.here }}",
        "field '--chat-template': the chat template failed to render (UndefinedError: 'nothing' is undefined)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TEMPLATES))
def test_a_bad_template_file_is_one_input_error(tmp_path, case):
    text, message = BAD_TEMPLATES[case]
    path = tmp_path / "t.jinja"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        resolve_prompt_format(str(path), _tokenizer(None))
    assert str(e.value) == f"{path}: {message}"
    # the same error from a format built by hand, at render time
    with pytest.raises(InputError) as e:
        PromptFormat("chat", text, str(path)).render(_tokenizer(None), "Question: 1+1?")
    assert str(e.value) == f"{path}: {message}"


def test_the_sandbox_is_kept(tmp_path):
    """The template runs in transformers' sandbox: reaching Python's objects is refused, not merely reported."""
    path = tmp_path / "t.jinja"
    path.write_text("{{ cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "pwned") + "') }}")
    with pytest.raises(InputError, match="refused by the Jinja sandbox|failed to render"):
        resolve_prompt_format(str(path), _tokenizer(None))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("case", ["syntax", "sandbox"])
def test_a_bad_template_file_through_the_cli_is_one_error_line(tmp_path, command, case):
    text, message = BAD_TEMPLATES[case]
    path = tmp_path / "t.jinja"
    path.write_text(text)
    out = tmp_path / ("c.jsonl" if command == "sample" else "e.json")
    r = cli(command, "--model", "arith-base", "--chat-template", path, "--n-questions", "2", "--out", out, "--quiet")
    assert r.code == 2 and "Traceback" not in r.stderr
    assert r.error_lines == [f"error: {path}: {message}"]
    assert not out.exists()
