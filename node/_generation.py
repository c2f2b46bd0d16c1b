"""What the HTTP API asks of the node: the backend interface and the events it yields.

The OpenAI-compatible layer (:mod:`._http`) speaks HTTP and JSON only; everything about
models, tokens and the mesh sits behind :class:`GenerationBackend`. Keeping the seam this
narrow lets the HTTP layer be tested against a backend the test controls, and lets the
node swap how it generates without touching the API.

Errors: a backend raises from :mod:`._errors`' tree, and the HTTP layer maps them:
``UnknownModelError`` → 404 ``model_not_found``; ``ContextLengthError`` → 400
``context_length_exceeded``; any other ``RequestError`` → 400 with its ``code``;
``NoRouteError`` and ``CannotDeployError`` → 503; anything else → 500, logged.
"""

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

CAUSAL_LM = "causal-lm"
EMBEDDING = "embedding"


@dataclass(frozen=True)
class ModelInfo:
    """A model the API can name. ``kind`` decides the routes that accept it:
    ``causal-lm`` for completions, ``embedding`` for embeddings (other kinds are listed
    but refused by both). ``context_length`` is in tokens, None when unknown."""

    name: str
    kind: str
    context_length: int | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "developer", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, already validated: exactly one of ``prompt`` (raw text, no
    template) and ``messages`` (the model's chat template applies) is set.

    ``top_k`` 0 means no top-k cut; ``temperature`` 0 means greedy; ``stop`` strings end
    the text without being part of it (finish reason ``stop``)."""

    model: str
    prompt: str | None
    messages: list[ChatMessage] | None
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TextPiece:
    """Newly generated text, in order; the pieces join into the whole completion."""

    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Finished:
    """The last event of every generation that was not cancelled: ``stop`` for an end
    token or a stop string, ``length`` when ``max_tokens`` (or the context) ran out."""

    finish_reason: Literal["stop", "length"]
    usage: Usage


GenerationEvent = TextPiece | Finished


@dataclass(frozen=True)
class Embeddings:
    """One row per input text, float32 ``[n, dim]``; ``prompt_tokens`` counts all inputs."""

    vectors: np.ndarray
    prompt_tokens: int


class GenerationBackend(Protocol):
    """What the node provides to the HTTP API.

    ``generate`` is an async generator: refusals (unknown model, a prompt over the
    context length) are raised from its first step, before any text, so the API can
    still answer with a 4xx. The API closes it (``aclose``) when the client goes away or
    the request times out; the backend must then stop generating and free the session.
    """

    async def models(self) -> list[ModelInfo]: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]: ...

    async def embed(self, model: str, texts: list[str]) -> Embeddings: ...
