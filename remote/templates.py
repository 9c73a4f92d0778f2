"""Named chat templates, chosen on purpose in the spec (``chat_template:``).

A base model has no chat template; an instruct model has its own. The spec may name one of
these (or give a Jinja string) and the trainer renders every conversation with it: the
template's special tokens are added to the tokenizer where it lacks them (their embedding rows
are trained with the adapter, as TRL's ``clone_chat_template`` does), and the template is saved
with the adapter's tokenizer, so merged and GGUF exports carry it too.

The templates render each turn's content exactly as given (no trimming), so the loss mask can
find every reply by rendering prefixes (``_data._assistant_spans``). Gemma has no system role:
a system turn is folded into the first user turn, as Gemma's own template asks users to do.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

__all__ = ["TEMPLATES", "Template", "apply_template", "check_template", "template_label"]


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat template and the special tokens it writes.

    Attributes:
        jinja: the template, in the Jinja dialect of ``transformers``' ``apply_chat_template``.
        special_tokens: tokens added as special tokens when the tokenizer lacks them.
        end_of_turn: the token that ends an assistant turn (generation stops there).
    """

    jinja: str
    special_tokens: tuple[str, ...] = ()
    end_of_turn: str | None = None


def _chatml(default_system: str | None = None) -> str:
    system = (
        "{%- if messages[0]['role'] != 'system' -%}"
        f"{{{{- '<|im_start|>system\\n{default_system}<|im_end|>\\n' -}}}}"
        "{%- endif -%}"
        if default_system
        else ""
    )
    return (
        system + "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


_LLAMA3 = (
    "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content']"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

_MISTRAL = (
    "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- set sys = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' "
    "else '' -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '[INST] ' + (sys if loop.index0 <= 1 else '') + message['content'] + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + message['content'] + (eos_token or '') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_GEMMA = (
    "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- set sys = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' "
    "else '' -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{- '<start_of_turn>' + role + '\\n'"
    " + (sys if loop.index0 <= 1 and message['role'] == 'user' else '')"
    " + message['content'] + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

TEMPLATES: dict[str, Template] = {
    "chatml": Template(_chatml(), _CHATML_TOKENS, "<|im_end|>"),
    "llama-3": Template(
        _LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"
    ),
    "mistral": Template(_MISTRAL),  # [INST] markers are text; a reply ends with eos
    "gemma": Template(_GEMMA, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    # Qwen2's template is ChatML that opens with a default system turn.
    "qwen": Template(_chatml("You are a helpful assistant."), _CHATML_TOKENS, "<|im_end|>"),
}


def _is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def check_template(value: str) -> None:
    """Accept a template name or a Jinja string.

    Raises:
        ValueError: neither (with the closest name, for a typo such as ``llama3``).
    """
    if value in TEMPLATES or _is_jinja(value):
        return
    import difflib

    close = difflib.get_close_matches(value.lower(), list(TEMPLATES), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown chat template {value!r}{hint} (known: {', '.join(TEMPLATES)}; or give a "
        'Jinja string such as "{% for message in messages %}...{% endfor %}")'
    )


def template_label(value: str | None) -> str:
    """How a run records the template it used: its name, or ``jinja:<sha256 prefix>``."""
    if value is None:
        return "model"
    if value in TEMPLATES:
        return value
    return "jinja:" + hashlib.sha256(value.encode()).hexdigest()[:12]


def apply_template(tokenizer: Any, value: str) -> list[str]:
    """Give ``tokenizer`` the named (or Jinja) template, adding its special tokens it lacks.

    Returns:
        The special tokens that were added (the caller resizes the embeddings and trains
        their rows).
    """
    check_template(value)
    template = TEMPLATES.get(value) or Template(value)
    tokenizer.chat_template = template.jinja
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.special_tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return missing
