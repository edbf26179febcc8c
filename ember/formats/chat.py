"""Chat templates: turn a list of messages into the prompt text a model was trained on.

A GGUF's `tokenizer.chat_template` is rendered with jinja2's sandbox, the way HF transformers
does it (trim_blocks, lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII). Models without a template get a built-in format: Gemma's turns for Gemma models, ChatML
when the vocabulary has `<|im_start|>`, and a plain "User:/Assistant:" transcript otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..errors import ChatTemplateError

if TYPE_CHECKING:
    import jinja2

ROLES = ("system", "user", "assistant", "tool")

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set first = '' %}{% endif %}"
    "{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ ((first if loop.first else '') + m['content']) | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _raise(message: str):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    import jinja2  # only when a template is used: `ember run --raw` never pays for it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not parse (line {e.lineno}: {e.message})") from None


def check_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a list of plain dicts, each with a known role and string content."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ChatTemplateError(f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatTemplateError(f"message {i}: content must be a string")
        out.append(dict(m))
    if not out:
        raise ChatTemplateError("there are no messages to render")
    return out


class ChatFormat:
    """A model's chat template with the tokens it refers to."""

    def __init__(
        self,
        template: str | None,
        *,
        bos_token: str = "",
        eos_token: str = "",
        architecture: str = "",
        vocab_has_chatml: bool = False,
    ):
        self.builtin = template is None
        if template is None:
            if architecture.startswith("gemma"):
                template, self.name = GEMMA_TEMPLATE, "gemma (built in)"
            elif vocab_has_chatml:
                template, self.name = CHATML_TEMPLATE, "chatml (built in)"
            else:
                template, self.name = PLAIN_TEMPLATE, "plain (built in)"
        else:
            self.name = "from the model"
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages, add_generation_prompt: bool = True, **extra: Any) -> str:
        import jinja2

        msgs = check_messages(messages)
        try:
            return _compile(self.source).render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template ({self.name}) failed to render: {e}") from None
        except Exception as e:  # a template is code from the file: any failure is the template's
            raise ChatTemplateError(
                f"the chat template ({self.name}) failed to render: {type(e).__name__}: {e}"
            ) from None
