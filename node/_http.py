"""The node's OpenAI-compatible HTTP API, served by hypercorn inside the node's trio loop.

A plain ASGI app (no framework: four routes do not need one, and owning the loop lets
every request run under one deadline and stop the moment its client goes away). Each
request is authorised, routed, read up to a size cap, validated, then answered by the
:class:`~._generation.GenerationBackend`; every refusal is an OpenAI-style error body,
and no failure of one request reaches another.
"""

import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import trio

from ..mesh.wire import SchemaError
from . import _openai
from ._errors import (
    CannotDeployError,
    ConfigError,
    ContextLengthError,
    NoRouteError,
    RequestError,
    SalalaError,
    UnknownModelError,
)
from ._generation import (
    CAUSAL_LM,
    EMBEDDING,
    Finished,
    GenerationBackend,
    GenerationEvent,
    ModelInfo,
    TextPiece,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # when neither the request nor the model's context says more
MIN_KEY_CHARS = 16

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class HttpSettings:
    """Where the API listens and what it admits. A key, once set, guards every route."""

    host: str
    port: int
    key: str | None = None
    max_body_bytes: int = 4 << 20
    body_timeout: float = 30.0  # to receive a request body
    request_timeout: float = 600.0  # from the body's end to the response's end

    @classmethod
    def parse(cls, listen: str, key: str | None) -> "HttpSettings":
        """``HOST:PORT`` (``[v6]:PORT`` for IPv6); refuses a bind beyond this device
        without a key, since anyone on the network could then use the mesh."""
        host, sep, port_text = listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(f"--http {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(
                    f"--http {listen!r}: give an IP address (or localhost), not a host name"
                ) from None
        if key is not None and len(key) < MIN_KEY_CHARS:
            raise ConfigError(f"--http-key must be at least {MIN_KEY_CHARS} characters")
        if key is None and not is_loopback(host):
            raise ConfigError(
                f"--http {listen}: {host} is reachable from other devices; serving the API "
                "there needs an API key (--http-key), which clients send as "
                "'Authorization: Bearer KEY'"
            )
        return cls(host, int(port_text), key)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


class ApiError(Exception):
    """A refusal with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = _openai.error_body(message, kind, param, code)
        self.headers = headers or []


def api_error(exc: Exception) -> ApiError:
    """The HTTP answer for an error from the backend or the request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, SchemaError):
        return ApiError(400, str(exc), param=exc.field or None, code="invalid_value")
    if isinstance(exc, UnknownModelError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, NoRouteError | CannotDeployError):
        return ApiError(503, str(exc), kind="server_error", code=exc.code)
    if isinstance(exc, RequestError):
        return ApiError(400, str(exc), code=exc.code)
    if isinstance(exc, SalalaError):
        return ApiError(500, str(exc), kind="server_error", code="internal")
    log.error("HTTP API request failed", exc_info=exc)
    return ApiError(500, "internal error in the node", kind="server_error", code="internal")


class _Response:
    """One request's answer, as a JSON body or a stream of server-sent events; remembers
    how far it got, so a failure can still be told in whatever form is left."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False

    async def json(self, status: int, body: Any, headers: list[tuple[bytes, bytes]]) -> None:
        data = json.dumps(body).encode()
        await self._start(status, [(b"content-type", b"application/json"), *headers])
        await self._body(data, more=False)

    async def open_stream(self) -> None:
        await self._start(
            200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        )

    async def event(self, data: Any) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        await self._body(f"data: {payload}\n\n".encode(), more=True)

    async def close_stream(self) -> None:
        await self._body(b"", more=False)

    async def fail(self, error: ApiError) -> None:
        if not self.started:
            await self.json(error.status, error.body, error.headers)
        elif not self.finished:  # mid-stream: OpenAI clients raise on an error event
            await self.event(error.body)
            await self.close_stream()

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def _body(self, data: bytes, *, more: bool) -> None:
        self.finished = not more
        await self._send({"type": "http.response.body", "body": data, "more_body": more})


class _ClientGone(Exception):
    """The client closed the connection before its request was read."""


Handler = Callable[[Any, _Response], Awaitable[None]]


class HttpApi:
    """The ASGI app: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` and
    ``/v1/embeddings`` over a :class:`GenerationBackend`."""

    def __init__(self, backend: GenerationBackend, settings: HttpSettings) -> None:
        self.backend = backend
        self.settings = settings
        self._key = settings.key.encode() if settings.key is not None else None
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/models": {"GET": self._models},
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/embeddings": {"POST": self._embeddings},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            response = _Response(send)
            try:
                await self._serve(scope, receive, response)
            except _ClientGone:
                pass
            except Exception as exc:
                await response.fail(api_error(exc))

    async def _serve(self, scope: Scope, receive: Receive, response: _Response) -> None:
        self._authorise(scope)
        handler = self._route(scope)
        body = None
        if scope["method"] == "POST":
            body = _parse_json(await self._read_body(scope, receive))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_gone, receive, nursery.cancel_scope)
            with trio.move_on_after(self.settings.request_timeout) as deadline:
                try:
                    await handler(body, response)
                except Exception as exc:
                    await response.fail(api_error(exc))
            if deadline.cancelled_caught:
                message = f"no answer within {self.settings.request_timeout:g} s"
                await response.fail(ApiError(504, message, kind="server_error", code="timeout"))
            nursery.cancel_scope.cancel()

    def _authorise(self, scope: Scope) -> None:
        if self._key is None:
            return
        given = _header(scope, b"authorization") or b""
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers=[(b"www-authenticate", b"Bearer")],
            )

    def _route(self, scope: Scope) -> Handler:
        path, method = scope["path"], scope["method"]
        if path.startswith("/v1/models/") and method == "GET":
            name = path.removeprefix("/v1/models/")
            return lambda body, response: self._model(name, response)
        methods = self._routes.get(path.rstrip("/") or "/")
        if methods is None:
            raise ApiError(404, f"no route {method} {path}", code="unknown_url")
        if method not in methods:
            allow = ", ".join(methods).encode()
            raise ApiError(
                405,
                f"{path} takes {', '.join(methods)}, not {method}",
                code="method_not_allowed",
                headers=[(b"allow", allow)],
            )
        return methods[method]

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        with trio.move_on_after(self.settings.body_timeout) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        assert deadline.cancelled_caught
        raise ApiError(408, "the request body did not arrive in time", code="timeout")

    # ---- routes -----------------------------------------------------------------------

    async def _find(self, name: str, kind: str | None) -> ModelInfo:
        for info in await self.backend.models():
            if info.name == name:
                if kind is not None and info.kind != kind:
                    raise ApiError(
                        400,
                        f"model {name!r} is a {info.kind} model; this route needs {kind}",
                        param="model",
                        code="unsupported_model",
                    )
                return info
        raise ApiError(
            404, f"the model {name!r} does not exist", param="model", code="model_not_found"
        )

    async def _models(self, body: Any, response: _Response) -> None:
        await response.json(200, _openai.model_list(await self.backend.models()), [])

    async def _model(self, name: str, response: _Response) -> None:
        await response.json(200, _openai.model_entry(await self._find(name, None)), [])

    async def _chat(self, body: Any, response: _Response) -> None:
        await self._complete(body, response, chat=True)

    async def _completions(self, body: Any, response: _Response) -> None:
        await self._complete(body, response, chat=False)

    async def _complete(self, body: Any, response: _Response, *, chat: bool) -> None:
        name = _openai.peek_model(body)
        info = await self._find(name, CAUSAL_LM) if name is not None else None
        default = (info and info.context_length) or DEFAULT_MAX_TOKENS
        completion = _openai.parse_completion(body, chat=chat, default_max_tokens=default)
        assert info is not None  # the schema refuses a body without a model
        limit = info.context_length
        if limit is not None and completion.request.max_tokens > limit:
            raise ApiError(
                400,
                f"max_tokens {completion.request.max_tokens} is over the model's context "
                f"length of {limit} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        reply = _openai.Reply(completion)
        async with aclosing(self.backend.generate(completion.request)) as events:
            first = await _next(events)  # refusals arrive here, before any answer
            if completion.stream:
                await _stream(reply, completion.include_usage, first, events, response)
            else:
                pieces = []
                event = first
                while isinstance(event, TextPiece):
                    pieces.append(event.text)
                    event = await _next(events)
                await response.json(200, reply.whole("".join(pieces), event), [])

    async def _embeddings(self, body: Any, response: _Response) -> None:
        name = _openai.peek_model(body)
        if name is not None:
            await self._find(name, EMBEDDING)
        request = _openai.parse_embedding(body)
        result = await self.backend.embed(request.model, request.texts)
        if result.vectors.ndim != 2 or len(result.vectors) != len(request.texts):
            raise RuntimeError(
                f"backend gave {result.vectors.shape} for {len(request.texts)} texts"
            )
        await response.json(
            200, _openai.embedding_body(request, result.vectors, result.prompt_tokens), []
        )


async def _next(events: AsyncIterator[GenerationEvent]) -> GenerationEvent:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        raise RuntimeError("the backend ended a generation without a Finished event") from None


async def _stream(
    reply: _openai.Reply,
    include_usage: bool,
    event: GenerationEvent,
    events: AsyncIterator[GenerationEvent],
    response: _Response,
) -> None:
    await response.open_stream()
    if reply.chat:
        await response.event(reply.chunk(None))
    while isinstance(event, TextPiece):
        if event.text:
            await response.event(reply.chunk(event.text))
        event = await _next(events)
    assert isinstance(event, Finished)
    await response.event(reply.chunk(None, event.finish_reason))
    if include_usage:
        await response.event(reply.usage_chunk(event))
    await response.event("[DONE]")
    await response.close_stream()


async def _cancel_when_gone(receive: Receive, scope: trio.CancelScope) -> None:
    """Stop the request's work the moment its client disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


def _parse_json(data: bytes) -> Any:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


async def serve_http(
    settings: HttpSettings,
    backend: GenerationBackend,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]  # stale trio-stubs from libp2p
) -> None:
    """Serve the API until cancelled; ``task_status`` gets the URL it listens on (the
    real port when ``settings.port`` is 0).

    hypercorn is imported here, not at the top: most nodes never serve HTTP, and the
    server would otherwise sit in every node's memory (bench/idle.py measures it)."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve

    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = log
    config.include_server_header = False
    config.h11_max_incomplete_size = 16 << 10  # request line and headers
    app = HttpApi(backend, settings)
    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(serve, app, config)  # type: ignore[arg-type]
        except OSError as exc:  # the port is taken, or the address is not this device's
            raise ConfigError(f"--http {config.bind[0]}: {exc.strerror or exc}") from exc
        log.info("HTTP API on %s", ", ".join(binds))
        task_status.started(binds[0])
