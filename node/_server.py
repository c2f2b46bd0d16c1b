"""The local API server: framed msgpack over a Unix socket only its owner can open.

Each connection is served by its own task; a client that sends garbage, stalls, or dies
mid-request only ends its own connection. Every read and write has a deadline.
"""

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ._errors import BadRequestError, NodeError, SalalaError
from ._protocol import HEADER, frame_length, frame_parts, unpack_body
from ._service import NodeService, translate

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 3600.0  # a connected client may wait this long between requests
TRANSFER_TIMEOUT_S = 120.0  # to finish receiving a request or sending a reply
_CHUNK = 1 << 20


class _ClientGone(Exception):
    """The client closed its end, possibly mid-frame."""


async def _receive_exactly(stream: trio.SocketStream, count: int) -> bytearray:
    """``count`` bytes, received into one buffer allocated up front (no growing copies)."""
    buffer = bytearray(count)
    view, got = memoryview(buffer), 0
    while got < count:
        try:
            n = await stream.socket.recv_into(view[got:], min(count - got, _CHUNK))
        except OSError as exc:
            raise _ClientGone from exc
        if not n:
            raise _ClientGone
        got += n
    return buffer


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    for part in frame_parts(message):
        await stream.send_all(part)


def _error_reply(request_id: Any, error: SalalaError) -> dict[str, Any]:
    code = getattr(error, "code", NodeError.code)
    return {"id": request_id, "ok": False, "error": {"code": code, "message": str(error)}}


async def _dispatch(
    service: NodeService,
    body: bytes | bytearray,
    progress: Callable[[dict[str, Any]], None],
    emit: Callable[[dict[str, Any]], Awaitable[None]],
) -> dict[str, Any]:
    request_id = None
    try:
        request = unpack_body(body)
        request_id = request.get("id")
        method = request.get("method")
        params = request.get("params", {})
        handler = service.methods.get(method) if isinstance(method, str) else None
        if handler is None:
            raise BadRequestError(f"unknown method {method!r}; known: {sorted(service.methods)}")
        if not isinstance(params, dict):
            raise BadRequestError("params must be a map")
        if method in service.streams:
            result = await handler(params, emit)
        elif method in service.reports_progress:
            result = await handler(params, progress)
        else:
            result = await handler(params)
        return {"id": request_id, "ok": True, "result": result}
    except _ClientGone:
        raise  # a streamed event found the client gone: end the connection, not a bug
    except SalalaError as exc:
        return _error_reply(request_id, exc)
    except Exception as exc:
        user_error = translate(exc)
        if user_error is None:
            log.exception("internal error serving a request")
            user_error = NodeError(f"internal error: {type(exc).__name__}: {exc}")
        return _error_reply(request_id, user_error)


async def _dispatch_with_progress(
    service: NodeService, body: bytes | bytearray, stream: trio.SocketStream
) -> dict[str, Any]:
    """Run a request; progress events it reports are sent as frames meanwhile."""
    send, receive = trio.open_memory_channel[dict[str, Any]](64)

    def progress(event: dict[str, Any]) -> None:
        try:
            send.send_nowait(event)
        except trio.WouldBlock:
            pass  # a slow reader misses progress events, never the result

    async def pump() -> None:
        async for event in receive:
            with trio.fail_after(TRANSFER_TIMEOUT_S):
                await _send(stream, {"id": None, "progress": event})

    async def emit(event: dict[str, Any]) -> None:
        """A streamed event (a generated piece): never dropped, so it waits for the
        client, which slows the generation down to the client's pace."""
        try:
            with trio.fail_after(TRANSFER_TIMEOUT_S):
                await _send(stream, {"id": None, "event": event})
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            raise _ClientGone from exc

    gone = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        async with send:
            try:
                reply = await _dispatch(service, body, progress, emit)
            except _ClientGone:
                gone = True  # raised plainly below, not wrapped in the nursery's group
    if gone:
        raise _ClientGone
    return reply


async def _serve_connection(service: NodeService, limit: int, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while True:
                header = None
                with trio.move_on_after(IDLE_TIMEOUT_S):
                    header = await _receive_exactly(stream, HEADER.size)
                if header is None:
                    return  # idle too long: close
                try:
                    length = frame_length(bytes(header), limit)
                except BadRequestError as exc:
                    with trio.fail_after(TRANSFER_TIMEOUT_S):
                        await _send(stream, _error_reply(None, exc))
                    return  # cannot skip an oversized body safely: close
                with trio.fail_after(TRANSFER_TIMEOUT_S):
                    body = await _receive_exactly(stream, length)
                reply = await _dispatch_with_progress(service, body, stream)
                try:
                    with trio.fail_after(TRANSFER_TIMEOUT_S):
                        await _send(stream, reply)
                finally:
                    if service.stop_after_reply:
                        service.shutdown_requested.set()
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            return
        except Exception:  # a handler must never take the server down
            log.exception("API connection failed")


async def serve_api(
    path: Path,
    service: NodeService,
    max_request_bytes: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]  # stale trio-stubs from libp2p
) -> None:
    """Listen on ``path`` (mode 0600) until cancelled; removes the socket on exit."""
    listener_socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)  # the socket is born 0600: no window where others can open it
    try:
        await listener_socket.bind(str(path))
    finally:
        os.umask(previous)
    try:
        listener_socket.listen(128)
        listener = trio.SocketListener(listener_socket)
        task_status.started()

        async def handle(stream: trio.SocketStream) -> None:
            await _serve_connection(service, max_request_bytes, stream)

        await trio.serve_listeners(handle, [listener])
    finally:
        path.unlink(missing_ok=True)
        listener_socket.close()
