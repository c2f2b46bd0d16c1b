"""The OpenAI wire format: request schemas in, response bodies out; pure, no I/O.

Request bodies are checked with the combinators every wire in Salala uses
(``mesh.wire``'s schemas), with one difference: OpenAI clients send fields we have no
use for (``user``, ``presence_penalty``, ``metadata``, ...), so fields a route does not
know are dropped instead of refused. Fields that would change the answer in a way we
cannot honour (``n`` > 1, tools, log-probabilities, ...) are refused with a 400.
"""

import base64
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..mesh.wire import (
    Check,
    SchemaError,
    array,
    choice,
    flag,
    integer,
    nullable,
    number,
    record,
    text,
    where,
)
from ._generation import ChatMessage, Finished, GenerationRequest, ModelInfo

MAX_TEXT = 1 << 24  # characters in one prompt, message or input; the body cap is lower
MAX_MESSAGES = 4096
MAX_STOPS = 4  # as OpenAI
MAX_EMBED_INPUTS = 2048  # as OpenAI
MAX_TOKENS = 1 << 24
INT64 = (-(1 << 63), (1 << 64) - 1)


def fields(required: dict[str, Check], optional: dict[str, Check]) -> Check:
    """``record``, but fields it does not declare are dropped, not refused."""
    strict = record(required, optional)
    known = set(required) | set(optional)

    def check(value: Any, path: str) -> dict[str, Any]:
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k in known}
        return strict(value, path)  # type: ignore[no-any-return]

    return check


def only(*allowed: Any) -> Check:
    """A field we accept only at a value that changes nothing (``n: 1``, no tools)."""

    def check(value: Any, path: str) -> Any:
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise SchemaError(path, f"{str(value)[:80]} is not supported here")
        return value

    return check


def _texts(max_items: int, what: str) -> Check:
    """A string, or a list of strings (token-id lists are refused: we take text)."""
    items = array(text(MAX_TEXT), max_items, 1)

    def check(value: Any, path: str) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and not isinstance(value[0], str):
            raise SchemaError(path, f"{what} must be text; token ids are not supported")
        return items(value, path)  # type: ignore[no-any-return]

    return check


def _content(value: Any, path: str) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(value, str):
        return value
    parts = array(fields({"type": choice(["text"]), "text": text(MAX_TEXT)}, {}), 1024, 1)
    return "".join(part["text"] for part in parts(value, path))


NONEMPTY_TEXT = where(text(MAX_TEXT), bool, "must not be empty")
MESSAGE = fields({"role": choice(["system", "developer", "user", "assistant"])}, {})
SAMPLING: dict[str, Check] = {
    "max_tokens": nullable(integer(1, MAX_TOKENS)),
    "temperature": nullable(number(0, 2)),
    "top_p": nullable(where(number(0, 1), lambda v: v > 0, "must be above 0")),
    "top_k": nullable(integer(0, MAX_TOKENS)),
    "seed": nullable(integer(*INT64)),
    "stop": nullable(_texts(MAX_STOPS, "stop")),
    "n": nullable(where(integer(1, 128), lambda v: v == 1, "only n=1 is supported")),
    "stream": nullable(flag),
    "stream_options": nullable(fields({}, {"include_usage": nullable(flag)})),
    "logit_bias": nullable(only({})),
}
CHAT = fields(
    {"model": text(256), "messages": array(lambda v, p: v, MAX_MESSAGES, 1)},
    {
        **SAMPLING,
        "max_completion_tokens": nullable(integer(1, MAX_TOKENS)),
        "logprobs": nullable(only(False)),
        "top_logprobs": nullable(only(0)),
        "tools": nullable(only([])),
        "functions": nullable(only([])),
        "response_format": nullable(only({"type": "text"})),
    },
)
COMPLETION = fields(
    {"model": text(256), "prompt": _texts(1, "prompt")},
    {
        **SAMPLING,
        "logprobs": nullable(only(0)),
        "echo": nullable(only(False)),
        "best_of": nullable(only(1)),
        "suffix": nullable(only("")),
    },
)
EMBEDDING = fields(
    {"model": text(256), "input": _texts(MAX_EMBED_INPUTS, "input")},
    {"encoding_format": nullable(choice(["float", "base64"])), "dimensions": nullable(only())},
)


@dataclass(frozen=True)
class Completion:
    """A validated chat or text completion request and how to deliver it."""

    request: GenerationRequest
    stream: bool
    include_usage: bool
    chat: bool


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: list[str]
    base64: bool


def _messages(raw: list[Any]) -> list[ChatMessage]:
    out = []
    for i, item in enumerate(raw):
        path = f"messages[{i}]"
        role = MESSAGE(item, path)["role"]
        if "content" not in item:
            raise SchemaError(f"{path}.content", "is missing")
        out.append(ChatMessage(role, _content(item["content"], f"{path}.content")))
    return out


def parse_completion(body: Any, *, chat: bool, default_max_tokens: int) -> Completion:
    """A chat (``messages``) or text (``prompt``) completion body; SchemaError names the
    first bad field."""
    fields_ = CHAT(body, "") if chat else COMPLETION(body, "")
    options = fields_.get("stream_options") or {}
    max_tokens = fields_.get("max_completion_tokens") or fields_.get("max_tokens")
    request = GenerationRequest(
        model=fields_["model"],
        prompt=None if chat else fields_["prompt"][0],
        messages=_messages(fields_["messages"]) if chat else None,
        max_tokens=max_tokens or default_max_tokens,
        temperature=_or(fields_.get("temperature"), 1.0),
        top_p=_or(fields_.get("top_p"), 1.0),
        top_k=_or(fields_.get("top_k"), 0),
        seed=fields_.get("seed"),
        stop=fields_.get("stop") or [],
    )
    return Completion(
        request, bool(fields_.get("stream")), bool(options.get("include_usage")), chat
    )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def peek_model(body: Any) -> str | None:
    """The model a body names, before it is validated (to choose defaults by model)."""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def parse_embedding(body: Any) -> EmbeddingRequest:
    fields_ = EMBEDDING(body, "")
    return EmbeddingRequest(
        fields_["model"], fields_["input"], fields_.get("encoding_format") == "base64"
    )


# ---- responses ------------------------------------------------------------------------


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_entry(info: ModelInfo) -> dict[str, Any]:
    return {
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": "salala",
        "kind": info.kind,
        "context_length": info.context_length,
    }


def model_list(infos: Iterable[ModelInfo]) -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(info) for info in infos]}


class Reply:
    """The id, timestamp and shape shared by every chunk of one completion."""

    def __init__(self, completion: Completion) -> None:
        self.chat = completion.chat
        self.model = completion.request.model
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())  # a timestamp for the client, not a deadline

    def _head(self, stream: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if stream else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text_: str, finished: Finished) -> dict[str, Any]:
        choice_: dict[str, Any] = {"index": 0, "finish_reason": finished.finish_reason}
        if self.chat:
            choice_["message"] = {"role": "assistant", "content": text_}
        else:
            choice_["text"] = text_
        choice_["logprobs"] = None
        return {**self._head(False), "choices": [choice_], "usage": usage(finished)}

    def chunk(self, piece: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        """One streamed chunk; ``piece`` None with no reason is the chat's opening role."""
        choice_: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            if piece is None and finish_reason is None:
                choice_["delta"] = {"role": "assistant", "content": ""}
            else:
                choice_["delta"] = {} if piece is None else {"content": piece}
        else:
            choice_["text"] = piece or ""
        choice_["logprobs"] = None
        return {**self._head(True), "choices": [choice_]}

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(finished)}


def usage(finished: Finished) -> dict[str, int]:
    used = finished.usage
    return {
        "prompt_tokens": used.prompt_tokens,
        "completion_tokens": used.completion_tokens,
        "total_tokens": used.prompt_tokens + used.completion_tokens,
    }


def embedding_body(
    request: EmbeddingRequest, vectors: np.ndarray, prompt_tokens: int
) -> dict[str, Any]:
    """``base64`` is the little-endian float32 bytes, as the openai client decodes them."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(row.tobytes()).decode("ascii")
            if request.base64
            else row.tolist(),
        }
        for i, row in enumerate(rows)
    ]
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
