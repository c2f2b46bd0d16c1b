"""The Python client of a local node, with a blocking face and a trio face.

    node = salala.node.connect()                # blocking
    node.infer("minilm", {"input_ids": ...})

    async with await salala.node.connect_async() as node:   # trio
        await node.infer("minilm", {...})

Both build the same :mod:`._calls`; they differ only in how bytes move.
"""

import itertools
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import trio

from . import _calls as calls
from ._errors import NodeDisconnectedError, NodeNotRunningError
from ._paths import DataDir, resolve_data_dir
from ._protocol import HEADER, MAX_FRAME_LIMIT, frame_length

T = TypeVar("T")
Generated = calls.Generated


def _options(
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: str | list[str] | None,
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "stop": [stop] if isinstance(stop, str) else list(stop or []),
    }
    if seed is not None:
        options["seed"] = seed
    return options


CallFor = Callable[[Callable[[str], None], calls.Generated], "calls.Call[calls.Generated]"]


class GenerationStream(Iterator[str]):
    """Text pieces as the mesh generates them, on a connection of their own.
    ``close()`` (or leaving a ``with`` block) stops the generation; ``result`` holds the
    finish reason and token counts once the stream has ended."""

    def __init__(self, client: "Client", call_for: "CallFor") -> None:
        self.result = calls.Generated()
        self._client = client
        self._pending: list[str] = []
        self._frames = client._frames(call_for(self._pending.append, self.result))

    def __next__(self) -> str:
        while not self._pending:
            try:
                next(self._frames)
            except BaseException:  # the end, a refusal or a lost node: the connection goes
                self.close()
                raise
        return self._pending.pop(0)

    def close(self) -> None:
        """Stop the generation (if it still runs) and drop its connection."""
        self._frames.close()
        self._client.close()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncGenerationStream(AsyncIterator[str]):
    """The trio face of :class:`GenerationStream`."""

    def __init__(self, socket_path: Path, timeout: float, call_for: "CallFor") -> None:
        self.result = calls.Generated()
        self._socket_path = socket_path
        self._timeout = timeout
        self._pieces_send, self._pieces = trio.open_memory_channel[str](1 << 16)
        self._call = call_for(self._pieces_send.send_nowait, self.result)
        self._client: AsyncClient | None = None
        self._done = False

    async def __anext__(self) -> str:
        if self._client is None and not self._done:
            stream = await trio.open_unix_socket(str(self._socket_path))
            self._client = AsyncClient(stream, self._timeout, self._socket_path)
            self._frames = self._client._frames(self._call)
        while True:
            try:
                return self._pieces.receive_nowait()
            except trio.WouldBlock:
                pass
            if self._done:
                raise StopAsyncIteration
            try:
                await self._frames.__anext__()
            except BaseException:  # the end, a refusal or a lost node: the connection goes
                await self.aclose()
                raise

    async def aclose(self) -> None:
        """Stop the generation (if it still runs) and drop its connection."""
        self._done = True
        if self._client is not None:
            await self._client.aclose()

    async def __aenter__(self) -> "AsyncGenerationStream":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


CONNECT_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 600.0  # a first inference may load a large model


def _not_running(data_dir: DataDir, exc: Exception) -> NodeNotRunningError:
    return NodeNotRunningError(
        f"no node is running in {data_dir.root} ({exc}); start one with `salala node start`"
    )


class Client:
    """A blocking connection to the local node. One call at a time."""

    def __init__(self, data_dir: DataDir, timeout: float = CALL_TIMEOUT_S) -> None:
        self.data_dir = data_dir
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(CONNECT_TIMEOUT_S)
        try:
            self._socket.connect(str(data_dir.socket))
        except OSError as exc:
            self._socket.close()
            raise _not_running(data_dir, exc) from exc
        self._socket.settimeout(timeout)

    def _receive_exactly(self, count: int) -> bytearray:
        buffer = bytearray(count)  # allocated once: no growing copies
        view, got = memoryview(buffer), 0
        while got < count:
            n = self._socket.recv_into(view[got:], min(count - got, 1 << 20))
            if not n:
                raise NodeDisconnectedError("the node closed the connection")
            got += n
        return buffer

    def _call(self, call: calls.Call[T]) -> T:
        request_id = next(self._ids)
        try:
            try:
                for part in call.request(request_id):
                    self._socket.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the node may have refused early (say, too large): read why below
            while True:
                length = frame_length(self._receive_exactly(HEADER.size), MAX_FRAME_LIMIT)
                final, result = call.reply(request_id, self._receive_exactly(length))
                if final:
                    return result  # type: ignore[return-value]
        except (OSError, NodeDisconnectedError) as exc:  # OSError includes socket.timeout
            self.close()
            raise NodeDisconnectedError(f"lost the node during {call.method}: {exc}") from exc

    def _frames(self, call: calls.Call[T]) -> Generator[None, None, None]:
        """The I/O of ``_call``, yielding after each frame (for streamed events)."""
        request_id = next(self._ids)
        try:
            for part in call.request(request_id):
                self._socket.sendall(part)
            while True:
                length = frame_length(self._receive_exactly(HEADER.size), MAX_FRAME_LIMIT)
                final, _ = call.reply(request_id, self._receive_exactly(length))
                if final:
                    return
                yield
        except (OSError, NodeDisconnectedError) as exc:
            self.close()
            raise NodeDisconnectedError(f"lost the node during {call.method}: {exc}") from exc

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        stream: bool = True,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> "GenerationStream | calls.Generated":
        """Generate text with a language model deployed in the mesh.

        ``stream=True`` (default): an iterator of text pieces as they are generated
        (its ``result`` has the usage once it ends). ``stream=False``: the whole text
        and usage. ``messages`` (``[{"role", "content"}]``) use the model's chat
        template; ``temperature=0`` is greedy; a ``seed`` makes sampling repeatable.
        """
        options = _options(max_tokens, temperature, top_p, top_k, seed, stop)
        if not stream:
            generated = calls.Generated()
            return self._call(
                calls.generate(model, prompt, messages, options, lambda _: None, generated)
            )
        return GenerationStream(
            Client(self.data_dir, self.timeout),
            lambda on_piece, generated: calls.generate(
                model, prompt, messages, options, on_piece, generated
            ),
        )

    def status(self) -> dict[str, Any]:
        return self._call(calls.status())

    def models(self) -> list[dict[str, Any]]:
        return self._call(calls.models())

    def add_model(self, path: str | os.PathLike[str], name: str | None = None) -> dict[str, Any]:
        return self._call(calls.add_model(path, name))

    def split_model(self, name: str, parts: int) -> dict[str, Any]:
        return self._call(calls.split_model(name, parts))

    def infer(self, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._call(calls.infer(model, inputs))

    def peers(self) -> list[dict[str, Any]]:
        """Every member of the mesh this node knows, itself included, with capacity."""
        return self._call(calls.peers())

    def invite(self) -> dict[str, Any]:
        """A join URI for this mesh (it carries the mesh key: treat it as a secret)."""
        return self._call(calls.invite())

    def infer_traced(
        self, model: str, inputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Outputs and the route: which peer ran each stage, and for how long."""
        return self._call(calls.infer_traced(model, inputs))

    def deploy(
        self,
        model: str,
        shards: int | None = None,
        replicas: int = 1,
        codec: str = "raw",
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Place ``model`` across the mesh (``shards=None``: as many as pays off)."""
        return self._call(calls.deploy(model, shards, replicas, codec, on_progress))

    def deployments(self) -> list[dict[str, Any]]:
        """Every deployment the mesh knows, with the live hosts of each stage."""
        return self._call(calls.deployments())

    def undeploy(self, model: str) -> dict[str, Any]:
        """Remove ``model``'s deployment from the whole mesh; hosts unload its stages."""
        return self._call(calls.undeploy(model))

    def gc_models(self) -> dict[str, Any]:
        """Remove stored objects no named model and no live deployment uses."""
        return self._call(calls.gc_models())

    def train(
        self,
        job: "Mapping[str, Any] | str | PathLike[str]",
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Run a training job across the mesh (a table, or a JOB.toml path); see README."""
        return self._call(calls.train(job, on_progress))

    def shutdown(self) -> None:
        self._call(calls.shutdown())

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient:
    """A trio connection to the local node. Calls from several tasks take turns."""

    def __init__(
        self,
        stream: trio.SocketStream,
        timeout: float = CALL_TIMEOUT_S,
        socket_path: Path | None = None,
    ) -> None:
        self._stream = stream
        self.timeout = timeout
        self._socket_path = socket_path  # streams open connections of their own
        self._ids = itertools.count(1)
        self._turn = trio.Lock()

    async def _receive_exactly(self, count: int) -> bytearray:
        buffer = bytearray(count)  # allocated once: no growing copies
        view, got = memoryview(buffer), 0
        while got < count:
            n = await self._stream.socket.recv_into(view[got:], min(count - got, 1 << 20))
            if not n:
                raise NodeDisconnectedError("the node closed the connection")
            got += n
        return buffer

    async def _call(self, call: calls.Call[T]) -> T:
        async with self._turn:
            request_id = next(self._ids)
            try:
                with trio.fail_after(self.timeout):
                    try:
                        for part in call.request(request_id):
                            await self._stream.send_all(part)
                    except trio.BrokenResourceError:
                        pass  # the node may have refused early (say, too large): read why
                    while True:
                        header = await self._receive_exactly(HEADER.size)
                        body = await self._receive_exactly(frame_length(header, MAX_FRAME_LIMIT))
                        final, result = call.reply(request_id, body)
                        if final:
                            return result  # type: ignore[return-value]
            except (
                trio.BrokenResourceError,
                trio.TooSlowError,
                OSError,
                NodeDisconnectedError,
            ) as exc:
                await self._stream.aclose()
                raise NodeDisconnectedError(f"lost the node during {call.method}: {exc!r}") from exc

    async def _frames(self, call: calls.Call[T]) -> AsyncIterator[None]:
        """The I/O of ``_call``, yielding after each frame (for streamed events); the
        connection is this stream's own, so no turn is taken."""
        request_id = next(self._ids)
        try:
            for part in call.request(request_id):
                await self._stream.send_all(part)
            while True:
                with trio.fail_after(self.timeout):
                    header = await self._receive_exactly(HEADER.size)
                    body = await self._receive_exactly(frame_length(header, MAX_FRAME_LIMIT))
                final, _ = call.reply(request_id, body)
                if final:
                    return
                yield
        except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            await self._stream.aclose()
            raise NodeDisconnectedError(f"lost the node during {call.method}: {exc!r}") from exc

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        stream: bool = True,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> "AsyncGenerationStream | Awaitable[calls.Generated]":
        """``async for piece in node.generate(...)``, or
        ``await node.generate(..., stream=False)``; see :meth:`Client.generate`."""
        options = _options(max_tokens, temperature, top_p, top_k, seed, stop)
        if not stream:
            generated = calls.Generated()
            return self._call(
                calls.generate(model, prompt, messages, options, lambda _: None, generated)
            )
        if self._socket_path is None:
            raise NodeDisconnectedError("this client was not opened by connect_async()")
        return AsyncGenerationStream(
            self._socket_path,
            self.timeout,
            lambda on_piece, generated: calls.generate(
                model, prompt, messages, options, on_piece, generated
            ),
        )

    async def status(self) -> dict[str, Any]:
        return await self._call(calls.status())

    async def models(self) -> list[dict[str, Any]]:
        return await self._call(calls.models())

    async def add_model(
        self, path: str | os.PathLike[str], name: str | None = None
    ) -> dict[str, Any]:
        return await self._call(calls.add_model(path, name))

    async def split_model(self, name: str, parts: int) -> dict[str, Any]:
        return await self._call(calls.split_model(name, parts))

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self._call(calls.infer(model, inputs))

    async def peers(self) -> list[dict[str, Any]]:
        return await self._call(calls.peers())

    async def invite(self) -> dict[str, Any]:
        return await self._call(calls.invite())

    async def infer_traced(
        self, model: str, inputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        return await self._call(calls.infer_traced(model, inputs))

    async def deploy(
        self,
        model: str,
        shards: int | None = None,
        replicas: int = 1,
        codec: str = "raw",
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        return await self._call(calls.deploy(model, shards, replicas, codec, on_progress))

    async def deployments(self) -> list[dict[str, Any]]:
        return await self._call(calls.deployments())

    async def undeploy(self, model: str) -> dict[str, Any]:
        return await self._call(calls.undeploy(model))

    async def gc_models(self) -> dict[str, Any]:
        return await self._call(calls.gc_models())

    async def train(
        self,
        job: "Mapping[str, Any] | str | PathLike[str]",
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        return await self._call(calls.train(job, on_progress))

    async def shutdown(self) -> None:
        await self._call(calls.shutdown())

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def connect(
    data_dir: str | os.PathLike[str] | None = None, timeout: float = CALL_TIMEOUT_S
) -> Client:
    """Connect to the node serving ``data_dir`` (default: $SALALA_HOME or the user dir)."""
    return Client(resolve_data_dir(data_dir), timeout)


async def connect_async(
    data_dir: str | os.PathLike[str] | None = None, timeout: float = CALL_TIMEOUT_S
) -> AsyncClient:
    """The trio face of :func:`connect`."""
    resolved = resolve_data_dir(data_dir)
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            stream = await trio.open_unix_socket(str(resolved.socket))
    except (OSError, trio.TooSlowError) as exc:
        raise _not_running(resolved, exc) from exc
    return AsyncClient(stream, timeout, resolved.socket)
