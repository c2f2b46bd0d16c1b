"""Text generation across real node processes with the real SmolLM2 (issue 10).

One module-scoped mesh of three nodes serves SmolLM2 in three stages; every test here
compares what the mesh streams against the whole model run in one onnxruntime session
with its KV cache, token for token.
"""

import json
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import tokenizers
from conftest import NodeProcess
from llm_helpers import card_of, greedy_tokens, imported_smollm2
from mesh_helpers import formed, identity, mesh_of, wait_until
from salala.mesh import MeshKey, short_id
from salala.models import LlmCard, encode_texts, sentence_embeddings
from salala.node import (
    AsyncGenerationStream,
    CannotDeployError,
    ContextLengthError,
    connect_async,
)
from salala.runtime import ModelSession

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


class Whole:
    """The imported model in one session: the reference every mesh run must equal."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.card: LlmCard = card_of(folder)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.session = ModelSession(folder / "model.onnx", threads=1)

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def greedy_text(self, prompt: str, count: int) -> str:
        tokens = greedy_tokens(self.session.run, self.card, self.ids(prompt), count)
        tokens = [t for t in tokens if t not in self.card.eos_token_ids]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def model_folder() -> Path:
    return imported_smollm2("none")


@pytest.fixture(scope="module")
def whole(model_folder: Path) -> Whole:
    return Whole(model_folder)


@pytest.fixture(scope="module")
def smol_mesh(
    tmp_path_factory: pytest.TempPathFactory, model_folder: Path
) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("llm-mesh")
    with mesh_of(root, 3, None, "--threads", "1", "--http", "127.0.0.1:0") as nodes:
        formed(nodes)
        with nodes[0].client() as client:
            client.add_model(model_folder / "model.onnx", "smol")
            deployment = client.deploy("smol", shards=3)
        hosts = {stage["peers"][0] for stage in deployment["stages"]}
        assert len(hosts) == 3, deployment  # the plan spreads the model over the 3 nodes

        def everywhere() -> bool:
            for node in nodes:
                with node.client() as client:
                    found = [d for d in client.deployments() if d["model"] == "smol"]
                if not found or not all(s["hosts"] for s in found[0]["stages"]):
                    return False
            return True

        wait_until(everywhere, 30, "smol visible on every node")
        yield nodes


def mesh_text(node: NodeProcess, prompt: str, count: int, **options: object) -> str:
    with node.client() as client:
        return "".join(
            client.generate("smol", prompt, max_tokens=count, temperature=0.0, **options)
        )


def test_the_mesh_generates_exactly_what_the_whole_model_does(
    smol_mesh: list[NodeProcess], whole: Whole
) -> None:
    for prompt in PROMPTS:
        assert mesh_text(smol_mesh[0], prompt, 24) == whole.greedy_text(prompt, 24)
    # from a node whose own stage is not the first, too
    assert mesh_text(smol_mesh[2], PROMPTS[0], 12) == whole.greedy_text(PROMPTS[0], 12)


def test_finished_sessions_release_their_caches(smol_mesh: list[NodeProcess]) -> None:
    mesh_text(smol_mesh[1], PROMPTS[0], 4)

    def sessions() -> int:
        total = 0
        for node in smol_mesh:
            with node.client() as client:
                total += client.status()["kv_cache"]["sessions"]
        return total

    wait_until(lambda: sessions() == 0, 10, "every stage dropping the finished session")


def test_whole_answers_carry_usage(smol_mesh: list[NodeProcess], whole: Whole) -> None:
    with smol_mesh[1].client() as client:
        result = client.generate("smol", PROMPTS[0], max_tokens=8, temperature=0.0, stream=False)
    assert result.text == whole.greedy_text(PROMPTS[0], 8)
    assert result.prompt_tokens == len(whole.ids(PROMPTS[0]))
    assert result.completion_tokens == 8 and result.finish_reason == "length"


def test_concurrent_sessions_each_get_their_own_text(
    smol_mesh: list[NodeProcess], whole: Whole
) -> None:
    prompts = ["Once upon a time", "The best way to cook rice is", *PROMPTS]
    alone = {p: whole.greedy_text(p, 16) for p in prompts}
    got: dict[str, str] = {}

    def run(prompt: str, node: NodeProcess) -> None:
        got[prompt] = mesh_text(node, prompt, 16)

    threads = [
        threading.Thread(target=run, args=(p, smol_mesh[i % 3])) for i, p in enumerate(prompts)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert got == alone


def test_seeded_sampling_repeats(smol_mesh: list[NodeProcess]) -> None:
    with smol_mesh[0].client() as client:
        runs = [
            client.generate(
                "smol", PROMPTS[0], max_tokens=12, temperature=1.0, seed=42, stream=False
            ).text
            for _ in range(2)
        ]
        other = client.generate(
            "smol", PROMPTS[0], max_tokens=12, temperature=1.0, seed=43, stream=False
        ).text
    assert runs[0] == runs[1] != other


def test_a_prompt_over_the_context_is_refused_before_any_stage_runs(
    smol_mesh: list[NodeProcess], whole: Whole
) -> None:
    words = whole.card.context_length + 10
    with smol_mesh[0].client() as client:
        with pytest.raises(ContextLengthError, match="context holds"):
            client.generate("smol", "hi " * words, max_tokens=4, stream=False)
        status = client.status()
    assert status  # and the node still answers


@pytest.fixture(scope="module")
def whole_int4() -> Whole:
    """The int4 import: smaller and quicker to plan, for the tests that build meshes."""
    return Whole(imported_smollm2("int4"))


def generate_and_signal(
    asker: NodeProcess, victim: NodeProcess, how: signal.Signals, prompt: str, count: int
) -> tuple[str, int]:
    """Greedy text of ``count`` tokens, with ``how`` sent to ``victim`` after 10 pieces."""
    pieces: list[str] = []
    with asker.client() as client:
        stream = client.generate("smol", prompt, max_tokens=count, temperature=0.0)
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 10:
                victim.process.send_signal(how)
    return "".join(pieces), stream.result.completion_tokens


def test_generation_survives_losing_the_middle_stage(tmp_path: Path, whole_int4: Whole) -> None:
    """The middle stage's device is SIGKILLed 10 tokens into 40, then (in a second
    answer) the device that took the stage over is SIGSTOPped: each time the stage is
    re-planned onto another node, its cache rebuilt from prompt plus tokens so far, and
    the streamed text is exactly the undisturbed run's."""
    prompts, count = ["Once upon a time", "The best way to cook rice is"], 40
    # node-0 asks and holds every fragment (it split the model) but lends no memory, so
    # the stages land on the four others: three hosts and a spare.
    key = MeshKey.generate()
    with mesh_of(tmp_path, 1, key, "--threads", "1", "--max-memory-mb", "1") as first:
        _, bootstrap = identity(first[0])
        with mesh_of(tmp_path / "hosts", 4, key, "--threads", "1", "--peer", bootstrap) as hosts:
            asker = first[0]
            formed([asker, *hosts])
            by_id = {identity(n)[0]: n for n in hosts}
            with asker.client() as client:
                client.add_model(whole_int4.folder / "model.onnx", "smol")
                client.deploy("smol", shards=3)
            for prompt, how in zip(prompts, (signal.SIGKILL, signal.SIGSTOP), strict=True):
                with asker.client() as client:
                    (found,) = [d for d in client.deployments() if d["model"] == "smol"]
                victim = by_id[found["stages"][1]["hosts"][0]]
                text, tokens = generate_and_signal(asker, victim, how, prompt, count)
                assert text == whole_int4.greedy_text(prompt, count), how
                assert tokens == count
            victim.process.send_signal(signal.SIGCONT)


def test_a_model_too_big_for_one_node_deploys_across_three(
    tmp_path: Path, whole_int4: Whole
) -> None:
    """Each node lends 400 MiB: SmolLM2 in int4 needs about 650 MiB running (weights,
    a session's working memory, caches at its 8192-token context), so one node cannot
    take it and three can."""
    with mesh_of(tmp_path, 3, None, "--threads", "1", "--max-memory-mb", "400") as nodes:
        formed(nodes)
        with nodes[0].client() as client:
            client.add_model(whole_int4.folder / "model.onnx", "smol")
            with pytest.raises(CannotDeployError, match=r"needs about \d+ MiB") as refused:
                client.deploy("smol", shards=1)
            needed = int(re.search(r"needs about (\d+) MiB", str(refused.value))[1])  # type: ignore[index]
            assert needed > 400
            deployment = client.deploy("smol", shards=3)
        assert len({s["peers"][0] for s in deployment["stages"]}) == 3
        assert mesh_text(nodes[0], PROMPTS[0], 8) == whole_int4.greedy_text(PROMPTS[0], 8)


@pytest.fixture(scope="module")
def api(smol_mesh: list[NodeProcess]) -> Iterator[openai.OpenAI]:
    """The real openai client on node-0's --http (loopback, so no key is needed)."""
    found = wait_until(
        lambda: re.search(r"HTTP API on (http://\S+)", smol_mesh[0].log()), 30, "the HTTP API"
    )
    with openai.OpenAI(base_url=f"{found[1]}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_an_openai_client_streams_the_same_chat_as_node_generate(
    smol_mesh: list[NodeProcess], api: openai.OpenAI
) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with smol_mesh[0].client() as client:
        expected = client.generate(
            "smol", messages=messages, max_tokens=20, temperature=0.0, stream=False
        )
    chunks = api.chat.completions.create(
        model="smol",
        messages=messages,
        max_tokens=20,
        temperature=0.0,
        stream=True,  # type: ignore[arg-type]
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected.text and text
    completion = api.completions.create(
        model="smol", prompt=PROMPTS[0], max_tokens=8, temperature=0.0
    )
    assert completion.choices[0].text == mesh_text(smol_mesh[0], PROMPTS[0], 8)
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert "smol" in {m.id for m in api.models.list()}


def test_openai_embeddings_equal_node_infer(
    smol_mesh: list[NodeProcess], api: openai.OpenAI
) -> None:
    texts = ["a cat sits on the mat", "the stock market fell"]
    inputs = encode_texts(texts)
    with smol_mesh[0].client() as client:
        hidden = client.infer("minilm", inputs)["last_hidden_state"]
    expected = sentence_embeddings(hidden, inputs["attention_mask"])
    got = api.embeddings.create(model="minilm", input=texts, encoding_format="float")
    vectors = np.array([item.embedding for item in got.data])
    assert np.abs(vectors - expected).max() <= 1e-5


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "model_not_found"),
        ({"model": "smol", "prompt": "hi", "max_tokens": -1}, 400, None),
        ({"model": "smol", "prompt": "hi", "temperature": 3}, 400, None),
        (
            {"model": "smol", "prompt": "hi " * 9000, "max_tokens": 4},
            400,
            "context_length_exceeded",
        ),
        (b"{not json", 400, None),
    ],
)
def test_bad_requests_get_their_4xx_and_the_node_keeps_serving(
    smol_mesh: list[NodeProcess],
    api: openai.OpenAI,
    body: dict[str, object] | bytes,
    status: int,
    code: str | None,
) -> None:
    url = f"{api.base_url}completions"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=120)
    assert refused.value.code == status
    error = json.loads(refused.value.read())["error"]
    assert error["message"] and (code is None or error["code"] == code)
    completion = api.completions.create(model="smol", prompt="Hi", max_tokens=2, temperature=0)
    assert completion.choices[0].text


def test_a_node_without_room_for_a_session_says_so_and_a_replica_serves(
    tmp_path: Path, whole_int4: Whole
) -> None:
    """Two replicas of the whole model; the asking node lends no cache memory, so it
    refuses the session (cache_full) and the other replica generates it."""
    key = MeshKey.generate()
    with mesh_of(tmp_path / "a", 1, key, "--threads", "1", "--kv-cache-mb", "0") as first:
        _, bootstrap = identity(first[0])
        with mesh_of(tmp_path / "b", 1, key, "--threads", "1", "--peer", bootstrap) as second:
            nodes = [*first, *second]
            formed(nodes)
            with nodes[0].client() as client:
                client.add_model(whole_int4.folder / "model.onnx", "smol")
                deployment = client.deploy("smol", shards=1, replicas=2)
            assert len(deployment["stages"][0]["peers"]) == 2
            assert mesh_text(nodes[0], PROMPTS[1], 12) == whole_int4.greedy_text(PROMPTS[1], 12)
            asker = short_id(identity(nodes[0])[0])
            assert f"replaying without {asker}" in nodes[0].log()  # it refused itself


SALALA = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "salala")


def test_salala_generate_streams_the_whole_models_text(
    smol_mesh: list[NodeProcess], whole: Whole
) -> None:
    done = subprocess.run(
        [
            SALALA,
            "generate",
            "smol",
            PROMPTS[1],
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "--data-dir",
            str(smol_mesh[1].data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == whole.greedy_text(PROMPTS[1], 16) + "\n"


def test_salala_chat_keeps_history_and_leaves_cleanly(smol_mesh: list[NodeProcess]) -> None:
    chat = subprocess.Popen(
        [
            SALALA,
            "chat",
            "smol",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--data-dir",
            str(smol_mesh[0].data_dir),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = chat.communicate("What is 2 + 2?\nAnd 3 + 3?\n", timeout=300)  # then EOF
    assert chat.returncode == 0, err
    assert out.count("> ") == 3 and "Traceback" not in err  # two answers, then EOF leaves
    interrupted = subprocess.Popen(
        [SALALA, "chat", "smol", "--data-dir", str(smol_mesh[0].data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert interrupted.stdout is not None
    assert "chatting with smol" in interrupted.stdout.readline()  # now waiting at its prompt
    interrupted.send_signal(signal.SIGINT)
    out, err = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 0 and "Traceback" not in err, err


async def test_the_trio_face_streams_and_returns_whole_answers(
    smol_mesh: list[NodeProcess], whole: Whole
) -> None:
    async with await connect_async(smol_mesh[2].data_dir) as node:
        stream = node.generate("smol", PROMPTS[0], max_tokens=10, temperature=0.0)
        assert isinstance(stream, AsyncGenerationStream)
        pieces = [piece async for piece in stream]
        result = await node.generate(  # type: ignore[misc]
            "smol", PROMPTS[0], max_tokens=10, temperature=0.0, stream=False
        )
    assert "".join(pieces) == result.text == whole.greedy_text(PROMPTS[0], 10)
    assert stream.result.completion_tokens == 10


def test_leaving_a_stream_early_stops_it_and_the_node_serves_on(
    smol_mesh: list[NodeProcess], whole: Whole
) -> None:
    with smol_mesh[0].client() as client:
        with client.generate("smol", PROMPTS[0], max_tokens=500, temperature=0.0) as pieces:
            assert next(iter(pieces))
        assert client.generate(
            "smol", PROMPTS[1], max_tokens=6, temperature=0.0, stream=False
        ).text == whole.greedy_text(PROMPTS[1], 6)
