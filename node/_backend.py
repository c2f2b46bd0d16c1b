"""The node's :class:`~._generation.GenerationBackend`, behind its HTTP API.

Generation across the mesh is being wired in (issue 10); until then this backend lists
the stored models and refuses to generate or embed with a clear error, so
``--http`` already serves, authenticates and validates.
"""

from collections.abc import AsyncGenerator

import trio

from ._errors import NodeError
from ._generation import Embeddings, GenerationEvent, GenerationRequest, ModelInfo
from ._service import NodeService

NOT_YET = "this node cannot generate text or embeddings over HTTP yet"


class NodeBackend:
    def __init__(self, service: NodeService) -> None:
        self.service = service

    async def models(self) -> list[ModelInfo]:
        stored = await trio.to_thread.run_sync(self.service.store.list)
        return [ModelInfo(model.name, "onnx") for model in stored]

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        raise NodeError(NOT_YET)

    async def embed(self, model: str, texts: list[str]) -> Embeddings:
        raise NodeError(NOT_YET)
