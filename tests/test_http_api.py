"""The OpenAI-compatible HTTP API, driven by the real ``openai`` client.

The server is the real HttpApi on hypercorn, in this test's trio loop, on 127.0.0.1 with
an ephemeral port. The backend is a small deterministic one that the tests control: the
mesh's generation is wired in behind the same interface and tested with real nodes.
Blocking clients (openai's sync client, http.client) run in threads.
"""

import http.client
import json
import re
import subprocess
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
import trio
from conftest import start_node
from salala.node import ConfigError, ContextLengthError, NodeError
from salala.node._config import load_file_config
from salala.node._generation import (
    ChatMessage,
    Embeddings,
    Finished,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    TextPiece,
    Usage,
)
from salala.node._http import HttpSettings, serve_http
from salala.node._launch import SALALA
from salala.node._paths import DataDir

PIECES = ["Bonjour", ",", " le", " maillage", " é", "🙂", "!"]
KEY = "k" * 8 + "-test-key-0123"
DIM = 8


class FakeBackend:
    """Deterministic generation and embeddings, recording what it was asked and whether
    a generation was closed before it finished."""

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []
        self.closed_early = trio.Event()
        self.generating = trio.Event()

    async def models(self) -> list[ModelInfo]:
        return [
            ModelInfo("smol", "causal-lm", 64),
            ModelInfo("slow", "causal-lm", 64),
            ModelInfo("broken", "causal-lm", 64),
            ModelInfo("minilm", "embedding", 128),
            ModelInfo("mlp", "onnx"),
        ]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        self.requests.append(request)
        text = request.prompt or " ".join(m.content for m in request.messages or [])
        if "too long" in text:
            raise ContextLengthError("the prompt has 70 tokens; smol's context is 64")
        finished = False
        try:
            self.generating.set()
            pieces = PIECES[: request.max_tokens]
            for i, piece in enumerate(pieces):
                if request.model == "broken" and i == 2:
                    raise NodeError("stage 2 lost its peer")
                yield TextPiece(piece)
                if request.model == "slow":
                    await trio.sleep_forever()
            finished = True
            reason = "stop" if len(pieces) == len(PIECES) else "length"
            yield Finished(reason, Usage(len(text.split()), len(pieces)))
        finally:
            if not finished:
                self.closed_early.set()

    async def embed(self, model: str, texts: list[str]) -> Embeddings:
        vectors = np.array([[len(t) + i / 7 for i in range(DIM)] for t in texts], dtype=np.float32)
        return Embeddings(vectors, sum(len(t.split()) for t in texts))


CLIENTS: list[openai.OpenAI] = []


@asynccontextmanager
async def serving(backend: FakeBackend, **settings: Any) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_http, HttpSettings("127.0.0.1", 0, **settings), backend)
        try:
            yield url
        finally:
            while CLIENTS:
                CLIENTS.pop().close()
            nursery.cancel_scope.cancel()


def client(url: str, key: str = "unused") -> openai.OpenAI:
    """The real openai client, closed when the server that ``url`` names stops."""
    made = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
    CLIENTS.append(made)
    return made


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def raw(
    url: str,
    method: str,
    path: str,
    body: bytes | Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One plain HTTP request: status, headers and the parsed JSON body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


async def test_models_are_listed() -> None:
    async with serving(FakeBackend()) as url:
        models = await in_thread(lambda: list(client(url).models.list()))
        one = await in_thread(client(url).models.retrieve, "smol")
    assert [m.id for m in models] == ["smol", "slow", "broken", "minilm", "mlp"]
    assert one.id == "smol"


async def test_a_streamed_chat_joins_into_the_backends_text() -> None:
    backend = FakeBackend()
    async with serving(backend) as url:

        def chat() -> list[Any]:
            stream = client(url).chat.completions.create(
                model="smol",
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Salut"},
                ],
                stream=True,
                stream_options={"include_usage": True},
                temperature=0.5,
                top_p=0.9,
                seed=7,
                stop=["END"],
                user="someone",  # a field OpenAI clients send and we have no use for
                presence_penalty=0.1,
            )
            return list(stream)

        chunks = await in_thread(chat)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(PIECES)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == len(PIECES)
    assert chunks[-1].usage.prompt_tokens == 3
    (request,) = backend.requests
    assert request.messages == [ChatMessage("system", "Be brief."), ChatMessage("user", "Salut")]
    assert request.prompt is None
    assert (request.temperature, request.top_p, request.seed, request.stop) == (
        0.5,
        0.9,
        7,
        ["END"],
    )
    assert request.max_tokens == 64  # the model's context length when the request names none


async def test_whole_chat_and_text_completions_carry_usage() -> None:
    backend = FakeBackend()
    async with serving(backend) as url:
        chat = await in_thread(
            client(url).chat.completions.create,
            model="smol",
            messages=[{"role": "user", "content": [{"type": "text", "text": "two words"}]}],
            max_tokens=3,
        )
        text = await in_thread(
            client(url).completions.create, model="smol", prompt="The capital", top_p=1
        )
        streamed = await in_thread(
            lambda: [
                c.choices[0].text
                for c in client(url).completions.create(model="smol", prompt="x", stream=True)
            ]
        )
    assert chat.choices[0].message.content == "".join(PIECES[:3])
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (2, 3)
    assert chat.usage.total_tokens == 5
    assert text.choices[0].text == "".join(PIECES)
    assert text.choices[0].finish_reason == "stop"
    assert text.usage.completion_tokens == len(PIECES)
    assert "".join(streamed) == "".join(PIECES)
    assert backend.requests[1].prompt == "The capital" and backend.requests[1].messages is None


async def test_embeddings_as_floats_and_as_base64() -> None:
    texts = ["a cat", "the mesh runs models"]
    expected = (await FakeBackend().embed("minilm", texts)).vectors
    async with serving(FakeBackend()) as url:
        default = await in_thread(client(url).embeddings.create, model="minilm", input=texts)
        floats = await in_thread(
            client(url).embeddings.create, model="minilm", input="a cat", encoding_format="float"
        )
    assert (
        np.array([d.embedding for d in default.data], dtype=np.float32).tolist()
        == expected.tolist()
    )
    assert [d.index for d in default.data] == [0, 1]
    assert default.usage.prompt_tokens == 6
    assert np.array(floats.data[0].embedding, dtype=np.float32).tolist() == expected[0].tolist()


CHAT = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}
BAD_REQUESTS = [
    # (what, method, path, body, status, code)
    (
        "unknown model",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "model": "nope"},
        404,
        "model_not_found",
    ),
    (
        "unknown model to embed",
        "POST",
        "/v1/embeddings",
        {"model": "nope", "input": "x"},
        404,
        "model_not_found",
    ),
    ("unknown model by id", "GET", "/v1/models/nope", None, 404, "model_not_found"),
    (
        "embedding model asked to chat",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "model": "minilm"},
        400,
        "unsupported_model",
    ),
    (
        "chat model asked to embed",
        "POST",
        "/v1/embeddings",
        {"model": "smol", "input": "x"},
        400,
        "unsupported_model",
    ),
    (
        "zero max_tokens",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "max_tokens": 0},
        400,
        "invalid_value",
    ),
    (
        "negative max_tokens",
        "POST",
        "/v1/completions",
        {"model": "smol", "prompt": "a", "max_tokens": -5},
        400,
        "invalid_value",
    ),
    (
        "max_tokens over the context",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "max_tokens": 65},
        400,
        "context_length_exceeded",
    ),
    (
        "temperature over 2",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "temperature": 2.5},
        400,
        "invalid_value",
    ),
    (
        "negative temperature",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "temperature": -0.1},
        400,
        "invalid_value",
    ),
    ("top_p of 0", "POST", "/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "invalid_value"),
    (
        "top_p over 1",
        "POST",
        "/v1/completions",
        {"model": "smol", "prompt": "a", "top_p": 1.5},
        400,
        "invalid_value",
    ),
    ("negative top_k", "POST", "/v1/chat/completions", {**CHAT, "top_k": -1}, 400, "invalid_value"),
    ("n of 2", "POST", "/v1/chat/completions", {**CHAT, "n": 2}, 400, "invalid_value"),
    (
        "tools",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "tools": [{"type": "function"}]},
        400,
        "invalid_value",
    ),
    (
        "a string temperature",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "temperature": "hot"},
        400,
        "invalid_value",
    ),
    (
        "no messages",
        "POST",
        "/v1/chat/completions",
        {"model": "smol", "messages": []},
        400,
        "invalid_value",
    ),
    (
        "a bad role",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "invalid_value",
    ),
    (
        "no model",
        "POST",
        "/v1/chat/completions",
        {"messages": CHAT["messages"]},
        400,
        "invalid_value",
    ),
    (
        "token ids as a prompt",
        "POST",
        "/v1/completions",
        {"model": "smol", "prompt": [1, 2, 3]},
        400,
        "invalid_value",
    ),
    (
        "a prompt over the context",
        "POST",
        "/v1/completions",
        {"model": "smol", "prompt": "too long"},
        400,
        "context_length_exceeded",
    ),
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "smol",', 400, "invalid_json"),
    ("JSON that is not an object", "POST", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("bytes that are not UTF-8", "POST", "/v1/embeddings", b"\xff\xfe{}", 400, "invalid_json"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
    ("wrong method on models", "POST", "/v1/models", {}, 405, "method_not_allowed"),
    ("unknown route", "GET", "/v1/nothing", None, 404, "unknown_url"),
    (
        "body over the cap",
        "POST",
        "/v1/completions",
        {"model": "smol", "prompt": "x" * 70_000},
        413,
        "body_too_large",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_a_bad_request_gets_its_status_and_the_node_keeps_serving(
    method: str, path: str, body: Any, status: int, code: str
) -> None:
    async with serving(FakeBackend(), max_body_bytes=64 << 10) as url:
        got, headers, answer = await in_thread(raw, url, method, path, body)
        good = await in_thread(client(url).completions.create, model="smol", prompt="again")
    assert got == status, answer
    error = answer["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if status == 405:
        assert "allow" in {k.lower() for k in headers}
    assert good.choices[0].text == "".join(PIECES)


async def test_the_openai_client_raises_its_own_errors() -> None:
    async with serving(FakeBackend()) as url:
        with pytest.raises(openai.NotFoundError) as missing:
            await in_thread(
                client(url).chat.completions.create, model="nope", messages=CHAT["messages"]
            )
        with pytest.raises(openai.BadRequestError) as too_long:
            await in_thread(client(url).completions.create, model="smol", prompt="too long")
        with pytest.raises(openai.BadRequestError) as too_hot:
            await in_thread(
                client(url).chat.completions.create,
                model="smol",
                messages=CHAT["messages"],
                temperature=3,
            )
    assert missing.value.code == "model_not_found"
    assert (too_hot.value.code, too_hot.value.param) == ("invalid_value", "temperature")
    assert too_long.value.code == "context_length_exceeded"


async def test_a_chunked_body_over_the_cap_is_refused() -> None:
    def send_chunked(url: str) -> int:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            chunks = (b"x" * 4096 for _ in range(64))
            conn.request("POST", "/v1/embeddings", body=chunks, encode_chunked=True)
            return conn.getresponse().status
        except (BrokenPipeError, ConnectionResetError):  # the server may close first
            return 413
        finally:
            conn.close()

    async with serving(FakeBackend(), max_body_bytes=64 << 10) as url:
        assert await in_thread(send_chunked, url) == 413
        assert (await in_thread(raw, url, "GET", "/v1/models"))[0] == 200


async def test_a_key_guards_every_route() -> None:
    async with serving(FakeBackend(), key=KEY) as url:
        with pytest.raises(openai.AuthenticationError):
            await in_thread(lambda: list(client(url).models.list()))
        with pytest.raises(openai.AuthenticationError):
            await in_thread(lambda: list(client(url, "x" * len(KEY)).models.list()))
        models = await in_thread(lambda: list(client(url, KEY).models.list()))
        unknown, _, body = await in_thread(raw, url, "GET", "/v1/nothing")
        basic, _, _ = await in_thread(
            raw, url, "GET", "/v1/models", headers={"Authorization": f"Basic {KEY}"}
        )
    assert models[0].id == "smol"
    assert unknown == 401 and body["error"]["code"] == "invalid_api_key"  # routes stay hidden
    assert basic == 401


def test_a_bind_beyond_loopback_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="--http-key"):
        HttpSettings.parse("0.0.0.0:8000", None)
    with pytest.raises(ConfigError, match="--http-key"):
        HttpSettings.parse("[::]:8000", None)
    with pytest.raises(ConfigError, match="at least 16"):
        HttpSettings.parse("0.0.0.0:8000", "short")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        HttpSettings.parse("127.0.0.1", None)
    with pytest.raises(ConfigError, match="IP address"):
        HttpSettings.parse("example.com:80", None)
    assert HttpSettings.parse("0.0.0.0:8000", KEY).key == KEY
    assert HttpSettings.parse("[::1]:8001", None) == HttpSettings("::1", 8001)
    assert HttpSettings.parse("localhost:0", None).host == "localhost"


async def test_closing_a_stream_cancels_the_generation() -> None:
    backend = FakeBackend()
    async with serving(backend) as url:

        def read_one_piece_then_leave() -> str:
            stream = client(url).chat.completions.create(
                model="slow", messages=CHAT["messages"], stream=True
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stream.close()
                    return chunk.choices[0].delta.content
            raise AssertionError("the stream ended without a piece")

        assert await in_thread(read_one_piece_then_leave) == PIECES[0]
        with trio.fail_after(20):
            await backend.closed_early.wait()
        good = await in_thread(client(url).completions.create, model="smol", prompt="again")
    assert good.choices[0].text == "".join(PIECES)


async def test_a_request_past_its_deadline_ends_and_closes_the_generation() -> None:
    backend = FakeBackend()
    async with serving(backend, request_timeout=0.5) as url:
        status, _, body = await in_thread(
            raw, url, "POST", "/v1/chat/completions", {**CHAT, "model": "slow"}
        )
        with pytest.raises(openai.APIError, match="no answer within"):
            await in_thread(
                lambda: list(
                    client(url).chat.completions.create(
                        model="slow", messages=CHAT["messages"], stream=True
                    )
                )
            )
    assert status == 504 and body["error"]["code"] == "timeout"
    assert backend.closed_early.is_set()


async def test_a_failure_mid_stream_reaches_the_client_as_an_error() -> None:
    backend = FakeBackend()
    async with serving(backend) as url:
        with pytest.raises(openai.APIError, match="stage 2 lost its peer"):
            await in_thread(
                lambda: list(
                    client(url).chat.completions.create(
                        model="broken", messages=CHAT["messages"], stream=True
                    )
                )
            )
        status, _, body = await in_thread(
            raw, url, "POST", "/v1/chat/completions", {**CHAT, "model": "broken"}
        )
        good = await in_thread(client(url).completions.create, model="smol", prompt="again")
    assert status == 500 and "stage 2 lost its peer" in body["error"]["message"]
    assert good.choices[0].text == "".join(PIECES)


def test_config_toml_may_set_the_http_api(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    (tmp_path / "config.toml").write_text(f'[http]\nlisten = "0.0.0.0:8000"\nkey = "{KEY}"\n')
    assert load_file_config(data_dir).http == {"listen": "0.0.0.0:8000", "key": KEY}
    (tmp_path / "config.toml").write_text("[http]\nport = 8000\n")
    with pytest.raises(ConfigError, match=r"\[http\] takes only"):
        load_file_config(data_dir)


@pytest.mark.slow
def test_a_node_serves_its_http_api_and_guards_it_with_the_key(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", "--http", "127.0.0.1:0", "--http-key", KEY)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"HTTP API on (http://\S+)", node.log())):
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.1)
        url = found.group(1)
        with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as good:
            names = [m.id for m in good.models.list()]
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x" * 20, max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
    finally:
        assert node.stop() == 0, node.log()
    assert "minilm" in names


def test_a_node_refuses_a_non_loopback_bind_without_a_key(tmp_path: Path) -> None:
    started = subprocess.run(
        [SALALA, "node", "start", "--data-dir", str(tmp_path), "--http", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert started.returncode == 1
    assert "needs an API key (--http-key)" in started.stderr
    assert not (tmp_path / "api.sock").exists()
