"""Turning chat messages into a prompt with the model's own chat template.

Templates are Jinja, as Hugging Face ships them. A template arrives with a deployment
from another member, so it is rendered in Jinja's immutable sandbox: it can format
strings, never reach Python objects or files.
"""

from collections.abc import Sequence
from typing import Any

from ._errors import ModelError

ROLES = ("system", "user", "assistant", "tool")


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


def render_chat(template: str, messages: list[dict[str, str]], **specials: str) -> str:
    """The prompt for ``messages``, ending where the assistant's answer begins."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(
            messages=messages, add_generation_prompt=True, **specials
        )
    except TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc
