"""Turning chat messages into a prompt with the model's own chat template.

Templates are Jinja, as Hugging Face ships them. A template arrives with a deployment
from another member, so it is rendered in Jinja's immutable sandbox (it can format
strings, never reach Python objects or files), its ``*`` and ``**`` may not build
huge values, and its output stops at ``MAX_PROMPT_CHARS``. What the sandbox cannot
bound is time spent in loops that print nothing (see docs/architecture.md).
"""

from collections.abc import Sequence
from typing import Any

from ._errors import ModelError

ROLES = ("system", "user", "assistant", "tool")
MAX_PROMPT_CHARS = 4 << 20
_MAX_POWER = 1 << 64


class ChatTemplateError(ModelError):
    """The messages are malformed, or the model's template cannot render them."""


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as ``[{"role", "content"}]`` with known roles and string content."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} maps")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{index}] is not a map")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatTemplateError(f"messages[{index}].role must be one of {list(ROLES)}")
        if not isinstance(content, str):
            raise ChatTemplateError(f"messages[{index}].content must be a string")
        checked.append({"role": role, "content": content})
    return checked


def _bounded_binop(operator: str, left: Any, right: Any) -> Any:
    """``*`` and ``**`` as Python has them, refusing results too large to be a prompt."""
    if operator == "*":
        for sequence, count in ((left, right), (right, left)):
            if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                if len(sequence) * count > MAX_PROMPT_CHARS:
                    raise ChatTemplateError("the chat template builds a value too large")
        return left * right
    result = left**right
    if isinstance(result, int) and abs(result) > _MAX_POWER:
        raise ChatTemplateError("the chat template computes a number too large")
    return result


def render_chat(template: str, messages: list[dict[str, str]], **specials: str) -> str:
    """The prompt for ``messages``, ending where the assistant's answer begins."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            return _bounded_binop(operator, left, right)

    environment = Bounded(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    environment.globals["raise_exception"] = raise_exception
    try:
        pieces, size = [], 0
        rendered = environment.from_string(template).generate(
            messages=messages, add_generation_prompt=True, **specials
        )
        for piece in rendered:
            size += len(piece)
            if size > MAX_PROMPT_CHARS:
                raise ChatTemplateError(f"the chat template wrote over {MAX_PROMPT_CHARS} chars")
            pieces.append(piece)
        return "".join(pieces)
    except ChatTemplateError:
        raise
    except Exception as exc:  # Jinja's errors, and what a template's Python calls raise
        raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc
