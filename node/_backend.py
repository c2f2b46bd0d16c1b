"""The node's :class:`~._generation.GenerationBackend`, behind its HTTP API.

Language models are the mesh's deployments of kind ``causal-lm`` (generation runs
through :class:`~._llm.MeshGenerator`, like ``node.generate``). Embeddings use the same
path as ``node.infer``: the mesh's deployment of the model if there is one, else the
stored model on this node, with MiniLM's tokenizer and mean pooling.
"""

from collections.abc import AsyncGenerator

import numpy as np
import trio

from .. import models
from ._errors import BadRequestError, UnknownModelError
from ._generation import EMBEDDING, Embeddings, GenerationEvent, GenerationRequest, ModelInfo
from ._service import NodeService, translate

MAX_TEXTS = 256


class NodeBackend:
    def __init__(self, service: NodeService) -> None:
        self.service = service

    async def models(self) -> list[ModelInfo]:
        listed = {info.name: info for info in await self.service.generator.models()}
        stored = await trio.to_thread.run_sync(self.service.store.list)
        for model in stored:
            if model.name not in listed and models.llm_card(model) is None:
                kind = EMBEDDING if model.name == models.DEFAULT_MODEL else "onnx"
                listed[model.name] = ModelInfo(model.name, kind)
        if models.DEFAULT_MODEL in listed:
            listed[models.DEFAULT_MODEL] = ModelInfo(models.DEFAULT_MODEL, EMBEDDING)
        return sorted(listed.values(), key=lambda info: info.name)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """The mesh's generation, its refusals in the node's error tree (which the HTTP
        layer maps to status codes) rather than the mesh's or the models'."""
        events = self.service.generator.generate(request)
        try:
            async for event in events:
                yield event
        except Exception as exc:
            translated = translate(exc)
            if translated is None:
                raise
            raise translated from exc
        finally:
            await events.aclose()

    async def embed(self, model: str, texts: list[str]) -> Embeddings:
        if model != models.DEFAULT_MODEL:
            raise UnknownModelError(f"{model!r} is not an embedding model this node knows")
        if not 1 <= len(texts) <= MAX_TEXTS:
            raise BadRequestError(f"embed 1 to {MAX_TEXTS} texts at a time")
        inputs = await trio.to_thread.run_sync(models.encode_texts, texts)
        outputs, _ = await self.service.run(model, inputs)
        hidden = outputs["last_hidden_state"]
        mask = inputs["attention_mask"]
        vectors = models.sentence_embeddings(hidden, mask).astype(np.float32)
        return Embeddings(vectors, int(mask.sum()))
