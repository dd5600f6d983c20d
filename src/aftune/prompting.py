"""Prompt formats: how a task's plain prompt becomes the model's input, and how a response ends.

`plain` keeps the task's `Question: ...\\nAnswer:\\n` text. `chat` renders it as the user turn of the tokenizer's
chat template (instruct models) with the generation prompt added, so the response is trained and scored
exactly as the assistant turn. The format is recorded in every candidates file (CandidatesMeta.prompt_format)
and checked when a file is resumed or aligned, like the tokenizer.

    --chat-template auto   the tokenizer's template when it has one, else plain
    --chat-template none   plain
    --chat-template FILE   a Jinja chat template read from FILE (a model without one, or a custom one)

Templates run in transformers' Jinja sandbox (kept: a template file is untrusted input). A template that does
not compile, that the sandbox refuses (`{{ ''.__class__ }}`) or that fails while rendering is one InputError
naming the template file, checked when the format is resolved, before any model work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aftune.io import InputError

_PROBE = "\x00aftune-response\x00"  # a content string no template alters, to find where a turn's text ends


@dataclass(frozen=True)
class PromptFormat:
    """`kind` "plain" or "chat"; `template` the chat template source (None: the tokenizer's own); `source` the
    file it was read from (error messages name it)."""

    kind: str = "plain"
    template: str | None = None
    source: str | None = field(default=None, compare=False)

    def _apply(self, tokenizer, messages: list[dict[str, str]], **kwargs: Any) -> str:
        """tokenizer.apply_chat_template with this template; a Jinja error is an InputError naming the template."""
        import jinja2  # noqa: PLC0415 - transformers' dependency, needed only for chat formats

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template, **kwargs)
        except jinja2.TemplateError as e:
            raise _template_error(e, self.source) from None

    def render(self, tokenizer, prompt: str) -> str:
        """The text the model is given for a task prompt."""
        if self.kind == "plain":
            return prompt
        return self._apply(tokenizer, [{"role": "user", "content": prompt.strip()}], add_generation_prompt=True)

    def turn_end(self, tokenizer) -> str:
        """The text the template puts after an assistant message (e.g. Gemma's `<end_of_turn>`), without
        trailing whitespace; "" for plain prompts (the response then ends with EOS)."""
        if self.kind == "plain":
            return ""
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}]
        text = self._apply(tokenizer, msgs)
        if _PROBE not in text:
            raise InputError(
                "the chat template does not render the assistant message's content",
                self.source,
                field="--chat-template",
            )
        return text.split(_PROBE, 1)[1].rstrip()

    def response_end(self, tokenizer) -> list[int]:
        """Token ids that close a trained / scored response: the template's turn end, else EOS."""
        end = self.turn_end(tokenizer)
        if end:
            return tokenizer(end, add_special_tokens=False)["input_ids"]
        return [tokenizer.eos_token_id]

    def stop(self, tokenizer) -> tuple[str, ...]:
        """Extra stop strings for sampling: the turn end (the model may not emit EOS after it)."""
        end = self.turn_end(tokenizer)
        return (end,) if end else ()

    def to_meta(self, tokenizer) -> dict[str, Any]:
        """What a candidates file records: the kind and a hash of the template actually used."""
        if self.kind == "plain":
            return {"kind": "plain"}
        source = self.template if self.template is not None else tokenizer.chat_template
        return {"kind": "chat", "template_sha256": hashlib.sha256(str(source).encode()).hexdigest()}


PLAIN = PromptFormat()


def _template_error(e: Exception, source: str | None) -> InputError:
    """One line for a chat template that failed in Jinja: a syntax error (with the template's line), the sandbox
    refusing an operation, or an error raised while rendering (e.g. the template's own raise_exception)."""
    import jinja2  # noqa: PLC0415 - see PromptFormat._apply

    which = "the chat template" if source is not None else "the tokenizer's chat template"
    if isinstance(e, jinja2.TemplateSyntaxError):
        return InputError(f"{which} is not valid Jinja ({e.message})", source, e.lineno, "--chat-template")
    if isinstance(e, jinja2.exceptions.SecurityError):
        return InputError(f"{which} was refused by the Jinja sandbox ({e})", source, field="--chat-template")
    return InputError(f"{which} failed to render ({type(e).__name__}: {e})", source, field="--chat-template")


def resolve_prompt_format(spec: str | None, tokenizer) -> PromptFormat:
    """`--chat-template auto|none|FILE` -> a PromptFormat (auto: the tokenizer's template if it has one)."""
    spec = (spec or "none").strip()
    if spec == "none":
        return PLAIN
    if spec == "auto":
        return PromptFormat("chat") if getattr(tokenizer, "chat_template", None) else PLAIN
    path = Path(spec)
    if not path.is_file():
        raise InputError("expected auto, none or a chat template file; no such file", spec, field="--chat-template")
    try:
        fmt = PromptFormat("chat", path.read_text(encoding="utf-8"), spec)
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e})", spec, field="--chat-template") from None
    # A trial turn now: a broken template stops the command here, not after the model and data have loaded.
    fmt.render(tokenizer, "q")
    fmt.turn_end(tokenizer)
    return fmt


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids. A rendered chat prompt already holds the BOS text: adding special tokens would double it."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def stop_strings(task, fmt: PromptFormat, tokenizer) -> tuple[str, ...]:
    """Where sampling and eval cut a completion: the task's stop strings, then the chat turn end."""
    return tuple(dict.fromkeys((*task.stop, *fmt.stop(tokenizer))))
