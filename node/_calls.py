"""Each API call as data: method, params and how to read the result.

Both client faces send these; only their I/O differs (blocking socket or trio stream).
"""

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ._errors import ERRORS_BY_CODE, InvalidJobError, NodeDisconnectedError, NodeError
from ._protocol import decode_tensors, encode_tensors, frame_parts, unpack_body

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    params: dict[str, Any]
    read: Callable[[Any], T]
    on_progress: Callable[[dict[str, Any]], None] | None = None
    on_event: Callable[[dict[str, Any]], None] | None = None

    def request(self, request_id: int) -> tuple[bytes, bytes]:
        return frame_parts({"id": request_id, "method": self.method, "params": self.params})

    def reply(self, request_id: int, body: bytes | bytearray) -> tuple[bool, T | None]:
        """(True, result) for the final reply; (False, None) for a progress report.

        A refusal is raised as the matching error.
        """
        message = unpack_body(body)
        if "event" in message:
            if self.on_event is not None:
                self.on_event(message["event"])
            return False, None
        if "progress" in message:
            if self.on_progress is not None:
                self.on_progress(message["progress"])
            return False, None
        if message.get("id") not in (request_id, None):
            raise NodeDisconnectedError("the node answered a different request")
        if message.get("ok"):
            return True, self.read(message.get("result"))
        error = message.get("error") or {}
        cls = ERRORS_BY_CODE.get(str(error.get("code")), NodeError)
        raise cls(error.get("message", "the node refused the request"))


def _same(value: Any) -> Any:
    return value


def status() -> Call[dict[str, Any]]:
    return Call("status", {}, _same)


def models() -> Call[list[dict[str, Any]]]:
    return Call("models", {}, _same)


def add_model(path: str | PathLike[str], name: str | None = None) -> Call[dict[str, Any]]:
    resolved = Path(path).expanduser().resolve()  # the node's working dir is not ours
    return Call("add_model", {"path": str(resolved), "name": name or resolved.stem}, _same)


def split_model(name: str, parts: int) -> Call[dict[str, Any]]:
    return Call("split_model", {"name": name, "parts": parts}, _same)


def infer(model: str, inputs: Mapping[str, np.ndarray]) -> Call[dict[str, np.ndarray]]:
    return Call(
        "infer",
        {"model": model, "inputs": encode_tensors(inputs)},
        lambda result: decode_tensors(result["outputs"]),
    )


def infer_traced(
    model: str, inputs: Mapping[str, np.ndarray]
) -> Call[tuple[dict[str, np.ndarray], list[dict[str, Any]]]]:
    return Call(
        "infer",
        {"model": model, "inputs": encode_tensors(inputs)},
        lambda result: (decode_tensors(result["outputs"]), result["route"]),
    )


@dataclass
class Generated:
    """What a generation returned: its text, why it ended, and the tokens it cost."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def finish(self, result: Any) -> "Generated":
        if not isinstance(result, dict) or not isinstance(result.get("usage"), dict):
            raise NodeError("the node's generation result is malformed")
        self.finish_reason = str(result.get("finish_reason"))
        self.prompt_tokens = int(result["usage"].get("prompt_tokens", 0))
        self.completion_tokens = int(result["usage"].get("completion_tokens", 0))
        return self


def generate(
    model: str,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    options: Mapping[str, Any],
    on_piece: Callable[[str], None],
    generated: Generated,
) -> Call[Generated]:
    """Pieces go to ``on_piece`` as they arrive; ``generated`` collects the rest."""
    params = {"model": model, **options}
    if prompt is not None:
        params["prompt"] = prompt
    if messages is not None:
        params["messages"] = messages

    def on_event(event: dict[str, Any]) -> None:
        piece = event.get("text")
        if isinstance(piece, str):
            generated.text += piece
            on_piece(piece)

    return Call("generate", params, generated.finish, on_event=on_event)


def deploy(
    model: str,
    shards: int | None,
    replicas: int,
    codec: str,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> Call[dict[str, Any]]:
    params = {"model": model, "shards": shards, "replicas": replicas, "codec": codec}
    return Call("deploy", params, _same, on_progress)


def train(
    job: "Mapping[str, Any] | str | PathLike[str]",
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> Call[dict[str, Any]]:
    """A job table, or the path of a JOB.toml whose relative paths mean its folder."""
    if isinstance(job, Mapping):
        table, base = dict(job), Path.cwd()
    else:
        path = Path(job)
        try:
            table = tomllib.loads(path.read_text())
        except OSError as exc:
            raise InvalidJobError(f"cannot read job file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidJobError(f"job file {path} is not TOML: {exc}") from exc
        base = path.resolve().parent
    return Call("train", {"job": table, "base": str(base)}, _same, on_progress)


def deployments() -> Call[list[dict[str, Any]]]:
    return Call("deployments", {}, _same)


def undeploy(model: str) -> Call[dict[str, Any]]:
    return Call("undeploy", {"model": model}, _same)


def gc_models() -> Call[dict[str, Any]]:
    return Call("gc_models", {}, _same)


def peers() -> Call[list[dict[str, Any]]]:
    return Call("peers", {}, _same)


def invite() -> Call[dict[str, Any]]:
    return Call("invite", {}, _same)


def shutdown() -> Call[None]:
    return Call("shutdown", {}, lambda _: None)
