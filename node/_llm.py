"""Generating text across the mesh, for every face of the node (local API, CLI, HTTP).

The requester's half of generation: it fetches a deployed language model's card and
tokenizer once (from its own store or any host), turns a prompt or chat messages into
token ids, drives the token loop through the mesh (``mesh.generate_tokens``), and
turns tokens back into text pieces that never split a character or show part of a
stop string. Refusals (unknown model, a prompt over the context) are raised before
any stage runs, so the caller can still answer with a clear error.
"""

import json
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .. import models
from ..mesh import Inference, MeshError, Sampling, generate_tokens
from ._errors import BadRequestError, ContextLengthError, InvalidModelError, UnknownModelError
from ._generation import (
    CAUSAL_LM,
    Finished,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    TextPiece,
    Usage,
)

if TYPE_CHECKING:
    import tokenizers


@dataclass(frozen=True)
class TextModel:
    """A language model's text side: how prompts become tokens and tokens text."""

    card: models.LlmCard
    tokenizer: "tokenizers.Tokenizer"

    @classmethod
    def parse(cls, card: bytes, tokenizer: bytes) -> "TextModel":
        """From bytes another member sent: both are checked before use."""
        try:
            parsed = models.LlmCard.from_dict(json.loads(card))
        except (ValueError, RecursionError) as exc:  # bad JSON, nesting, or fields
            raise InvalidModelError(f"the model's card is not valid: {exc}") from exc
        try:  # the `text` extra: a node that only hosts stages never needs it
            import tokenizers
        except ImportError as exc:
            raise models.TokenizerMissingError(
                "generating text needs the tokenizers package: pip install 'salala[text]'"
            ) from exc
        try:
            loaded = tokenizers.Tokenizer.from_str(tokenizer.decode("utf-8"))
        except Exception as exc:  # tokenizers raises bare Exceptions for bad JSON
            raise InvalidModelError(f"the model's tokenizer does not load: {exc}") from exc
        if loaded.get_vocab_size() > parsed.vocab_size:
            raise InvalidModelError("the model's tokenizer is larger than its vocabulary")
        return cls(parsed, loaded)

    def special(self, token: int | None) -> str:
        return "" if token is None else self.tokenizer.id_to_token(token) or ""

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            if not self.card.chat_template:
                raise BadRequestError(f"{request.model} has no chat template; send a prompt")
            messages = models.check_messages(  # OpenAI's "developer" is the system role
                [
                    {"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in request.messages
                ]
            )
            text = models.render_chat(
                self.card.chat_template,
                messages,
                bos_token=self.special(self.card.bos_token_id),
                eos_token=self.special(self.card.eos_token_ids[0]),
            )
        else:
            text = request.prompt or ""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.card.add_bos_token and self.card.bos_token_id is not None:
            ids = [self.card.bos_token_id, *ids]
        return ids


class MeshGenerator:
    """Generation for this node's callers, over the mesh's deployments."""

    def __init__(self, inference: Inference) -> None:
        self.inference = inference
        self._text: dict[str, TextModel] = {}  # by the first fragment's hash
        self._loading: dict[str, trio.Lock] = {}  # one fetch per model at a time

    async def text_model(self, model: str) -> TextModel:
        deployment = self.inference.router.deployments().get(model)
        if deployment is None:
            raise UnknownModelError(f"no deployment of {model!r} in the mesh")
        key = deployment.entries[0].fragment
        async with self._loading.setdefault(key, trio.Lock()):
            if key not in self._text:
                try:
                    _, card, tokenizer = await self.inference.text_side(model)
                except MeshError as exc:
                    raise InvalidModelError(str(exc)) from exc
                self._text[key] = await trio.to_thread.run_sync(TextModel.parse, card, tokenizer)
            return self._text[key]

    async def models(self) -> list[ModelInfo]:
        """Deployed models; a language model's context is known once its card has been
        fetched (listing never waits on the network)."""
        listed = []
        for name, deployment in sorted(self.inference.router.deployments().items()):
            decoder = any(i.startswith("past_key_values.") for i in deployment.entries[0].inputs)
            if not decoder:
                listed.append(ModelInfo(name, "onnx"))
                continue
            text = self._text.get(deployment.entries[0].fragment)
            listed.append(ModelInfo(name, CAUSAL_LM, text.card.context_length if text else None))
        return listed

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Text pieces, then ``Finished``; refusals come before the first piece."""
        text = await self.text_model(request.model)
        prompt = await trio.to_thread.run_sync(text.prompt_ids, request)
        context = text.card.context_length
        if len(prompt) + 1 > context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; {request.model}'s context holds "
                f"{context}, which leaves no room for an answer"
            )
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        sampling = Sampling(request.temperature, request.top_p, request.top_k, seed)
        stream = models.TextStream(text.tokenizer, request.stop)
        generated, reason = 0, "length"
        tokens = generate_tokens(
            self.inference.router,
            request.model,
            prompt,
            max_tokens=request.max_tokens,
            context_length=context,
            vocab_size=text.card.vocab_size,
            sampling=sampling,
            stop_tokens=set(text.card.eos_token_ids),
            position_ids=text.card.position_ids,
        )
        try:
            async for token in tokens:
                generated += 1
                if token in text.card.eos_token_ids:
                    reason = "stop"
                    break
                piece = stream.push(token)
                if piece:
                    yield TextPiece(piece)
                if stream.stopped:
                    reason = "stop"
                    break
        finally:
            await tokens.aclose()
        rest = stream.finish()
        if rest:
            yield TextPiece(rest)
        yield Finished(reason, Usage(len(prompt), generated))  # type: ignore[arg-type]
