"""Text generation with SmolLM2-135M-Instruct: the mesh against one onnxruntime session
and against llama.cpp.

Every setup generates greedily (temperature 0). Time to first token (TTFT) and decode
tokens/s come from 32 tokens after a short prompt; prefill tokens/s is a ~100-token
prompt's length over its TTFT (one token generated). Each number is the best of
``REPEATS`` runs after a warm-up: this VM's two cores are shared with other work, which
only ever slows a run down (the concurrent rows say how many cores others took). Mesh
nodes are real processes on loopback, each with one onnxruntime thread; generation
streams through node 0's local API (``node.generate``), so TTFT there is the time to the
first text piece. The model is imported twice, float32 and int4 (weights only), once
per machine (``_smollm2``).

What the numbers cannot say by themselves, ``targets`` works out: the issue's ratios,
and where a mesh token's time goes (inside the sessions, outside them, per hop, and the
CPU all nodes spend on it, against two cores).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tokenizers
from salala.models import ModelStore, smollm2_gguf, split_stored
from salala.node import Client, connect
from salala.node._launch import LocalNode, local_mesh
from salala.node._paths import DataDir
from salala.runtime import ModelSession, measure_throughput

from ._smollm2 import card_of, greedy_tokens, imported_smollm2

MODEL = "smol"
DECODE_TOKENS = 32
REPEATS = 3
CONCURRENT = (4, 8)
SHORT_PROMPT = "The history of the Roman Empire"
LONG_PROMPT = (
    "The Roman Empire was the state ruled by the Romans following Octavian's assumption of "
    "sole rule under the Principate in 27 BC. It included territories in Europe, North "
    "Africa, and Western Asia, and was ruled by emperors. The fall of the Western Roman "
    "Empire in 476 AD conventionally marks the end of classical antiquity and the beginning "
    "of the Middle Ages. Rome had expanded its rule to most of the Mediterranean and beyond, "
    "and its history is often told as"
)
# bench/results/llama-cpp-python.log: what `make bench` printed building llama-cpp-python
LLAMA_LOG = Path(__file__).resolve().parent / "results" / "llama-cpp-python.log"
MB = 1 << 20
QUANTIZATIONS = {"float32": "none", "int4": "int4"}


@dataclass(frozen=True)
class Timed:
    """One generation: prompt and generated token counts, seconds from the request to
    the first token and to the end."""

    prompt_tokens: int
    tokens: int
    first_s: float
    total_s: float


Generate = Callable[[str, int], Timed]


def _cpu_s(processes: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process, every core)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _measure(generate: Generate, processes: list[psutil.Process]) -> dict[str, Any]:
    """TTFT, prefill and decode rates (best runs), and the CPU ``processes`` spent per
    token of the short-prompt runs."""
    generate(SHORT_PROMPT, 4)
    cpu = _cpu_s(processes)
    short = [generate(SHORT_PROMPT, DECODE_TOKENS) for _ in range(REPEATS)]
    cpu = _cpu_s(processes) - cpu
    long = [generate(LONG_PROMPT, 1) for _ in range(REPEATS)]
    decode = [(s.tokens - 1) / (s.total_s - s.first_s) for s in short]
    return {
        "ttft_ms": round(min(s.first_s for s in short) * 1000, 1),
        "prefill_tok_s": round(max(r.prompt_tokens / r.first_s for r in long), 1),
        "decode_tok_s": round(max(decode), 2),
        "cpu_ms_per_token": round(1000 * cpu / sum(s.tokens for s in short), 2),
        "prompt_tokens": [short[0].prompt_tokens, long[0].prompt_tokens],
        "tokens": short[0].tokens,
    }


def _whole_rows(name: str, folder: Path, threads: int | None) -> dict[str, Any]:
    """The imported model in one session with its KV cache, a greedy numpy loop."""
    card = card_of(folder)
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = ModelSession(folder / "model.onnx", threads=threads)

    def generate(prompt: str, count: int) -> Timed:
        started = time.perf_counter()
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        stamps: list[float] = []

        def run(feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            outputs = session.run(dict(feeds))
            stamps.append(time.perf_counter())
            return outputs

        tokens = greedy_tokens(run, card, ids, count)
        return Timed(len(ids), len(tokens), stamps[0] - started, time.perf_counter() - started)

    label = f"{threads} thread" if threads else "default threads"
    return {
        "model": name,
        "setup": f"whole model, 1 session, {label}",
        **_measure(generate, [psutil.Process()]),
        "stages": 1,
    }


def _streamed(client: Client, prompt: str, count: int) -> Timed:
    started = time.perf_counter()
    first: float | None = None
    stream = client.generate(MODEL, prompt, max_tokens=count, temperature=0.0)
    for _ in stream:
        first = first or time.perf_counter()
    ended = time.perf_counter()
    result = stream.result  # type: ignore[union-attr]  # stream=True gives a stream
    assert first is not None, "the mesh generated no text"
    return Timed(result.prompt_tokens, result.completion_tokens, first - started, ended - started)


def _concurrent(data_dir: Path, sessions: int, processes: list[psutil.Process]) -> dict[str, Any]:
    """``sessions`` generations at once, each on its own connection to the node. Also
    how many cores the nodes kept busy, and how many the machine's other processes took
    meanwhile (this VM's two cores are shared)."""
    done: list[Timed] = []
    clients = [connect(data_dir) for _ in range(sessions)]
    threads = [
        threading.Thread(target=lambda c=c: done.append(_streamed(c, SHORT_PROMPT, DECODE_TOKENS)))
        for c in clients
    ]
    cpu, busy = _cpu_s(processes), _busy_s()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cpu, busy = _cpu_s(processes) - cpu, _busy_s() - busy
    for client in clients:
        client.close()
    assert len(done) == sessions, "a session failed (see the node logs)"
    tokens = sum(t.tokens for t in done)
    return {
        "aggregate_tok_s": round(tokens / wall, 2),
        "ttft_ms": round(statistics.median(t.first_s for t in done) * 1000, 1),
        "cpu_ms_per_token": round(1000 * cpu / tokens, 2),
        "node_cores": round(cpu / wall, 2),
        "other_cores": round(max(0.0, busy - cpu) / wall, 2),
    }


def _mesh_label(nodes: int) -> str:
    return f"mesh, {nodes} node{'s' if nodes > 1 else ''}, 1 thread each"


def _mesh_rows(
    name: str,
    folder: Path,
    nodes: int,
    speed: str,
    concurrent: bool,
    node_args: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The model deployed in ``nodes`` stages over ``nodes`` single-thread nodes. Every
    node gets the same measured speed (``speed``, the throughput cache's JSON): they share
    one CPU, and the planner then cuts where the FLOPs balance, the same way each run."""
    label = _mesh_label(nodes) + (f" ({' '.join(node_args)})" if node_args else "")
    with tempfile.TemporaryDirectory(prefix="salala-bench-gen-") as tmp:
        for i in range(nodes):  # local_mesh starts node i in root / f"node-{i}"
            cache = DataDir(Path(tmp) / f"node-{i}").throughput_cache
            cache.parent.mkdir(parents=True)
            cache.write_text(speed)
        with local_mesh(Path(tmp), nodes, ["--threads", "1", *node_args]) as mesh:
            processes = [psutil.Process(node.process.pid) for node in mesh]
            idle = [p.memory_info().rss for p in processes]
            with connect(mesh[0].data_dir) as client:
                client.add_model(folder / "model.onnx", MODEL)
                deployment = client.deploy(MODEL, shards=nodes)
                single = _measure(lambda p, n: _streamed(client, p, n), processes)
            rows = [
                {
                    "model": name,
                    "setup": label,
                    "sessions": 1,
                    **single,
                    **_memory(deployment, mesh, processes, idle),
                }
            ]
            for sessions in CONCURRENT if concurrent else ():
                rows.append(
                    {
                        "model": name,
                        "setup": label,
                        "sessions": sessions,
                        **max(
                            (_concurrent(mesh[0].data_dir, sessions, processes) for _ in range(2)),
                            key=lambda r: r["aggregate_tok_s"],
                        ),
                    }
                )
    return rows


def _memory(
    deployment: dict[str, Any],
    mesh: list[LocalNode],
    processes: list[psutil.Process],
    idle: list[int],
) -> dict[str, Any]:
    """Per stage: its fragment's weights, and how much its host's RSS grew from the idle
    node (None for node 0, which also stored the whole model and planned the split:
    onnx loads it whole). Per node: RSS."""
    rss = [p.memory_info().rss for p in processes]
    growth = {}
    for node, process, before in zip(mesh[1:], processes[1:], idle[1:], strict=True):
        with connect(node.data_dir) as client:
            growth[client.status()["peer_id"]] = process.memory_info().rss - before
    stages = deployment["stages"]
    hosts = [stage["peers"][0] for stage in stages]
    return {
        "stages": len(stages),
        "hosts": len(set(hosts)),
        "stage_weights_mb": [round(s["weight_bytes"] / MB, 1) for s in stages],
        "stage_host_growth_mb": [round(growth[h] / MB, 1) if h in growth else None for h in hosts],
        "node_rss_mb": [round(r / MB) for r in rss],
    }


# Run in a fresh process: RSS growth from loading one fragment into a session.
_SESSION_RSS = """
import sys, psutil
from salala.runtime import ModelSession
before = psutil.Process().memory_info().rss
session = ModelSession(sys.argv[1], threads=1)
print(psutil.Process().memory_info().rss - before)
"""


def _stage_memory(name: str, folder: Path, parts: int = 3) -> dict[str, Any]:
    """Memory per stage of the FLOP-balanced split (what deploy gives equal peers):
    each fragment's weights, and the RSS a fresh process grows by when it loads the
    fragment's session. Deterministic cuts, unlike the mesh's plan (see ``_memory``)."""
    with tempfile.TemporaryDirectory(prefix="salala-bench-split-") as tmp:
        store = ModelStore(Path(tmp))
        plan = split_stored(store, store.add(folder / "model.onnx", MODEL), parts)
        rss = [
            int(
                subprocess.run(
                    [sys.executable, "-c", _SESSION_RSS, f.path],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            for f in plan.fragments
        ]
    return {
        "model": name,
        "setup": f"{parts} fragments, FLOP-balanced, each loaded alone",
        "stages": parts,
        "stage_weights_mb": [round(f.weight_bytes / MB, 1) for f in plan.fragments],
        "stage_session_rss_mb": [round(r / MB, 1) for r in rss],
    }


def _llama_rows() -> list[dict[str, Any]]:
    """llama.cpp on the GGUF the model was imported from (Q4_1): what a user of one
    device would run instead. Reported as not built when it did not build here.

    Its OpenMP threads wait passively: spinning, two of them fight the other work on
    this VM's two cores and a 95-token prefill takes 1 to 6 s instead of 0.7 s."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when libgomp loads
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return [{"model": "Q4_1 GGUF", "setup": "llama.cpp", "note": _not_built(exc)}]
    rows = []
    for threads in (1, psutil.cpu_count() or 1):
        llm = Llama(
            str(smollm2_gguf()),
            n_ctx=512,
            n_threads=threads,
            n_threads_batch=threads,  # prefill; it defaults to every core
            verbose=False,
        )

        def generate(prompt: str, count: int, llm: Llama = llm) -> Timed:
            started = time.perf_counter()
            ids = llm.tokenize(prompt.encode(), add_bos=False)
            llm.reset()  # no KV-cache reuse between runs
            first, tokens = 0.0, 0
            for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                tokens += 1
                first = first or time.perf_counter()
                if tokens == count or token == llm.token_eos():
                    break
            return Timed(len(ids), tokens, first - started, time.perf_counter() - started)

        rows.append(
            {
                "model": "Q4_1 GGUF",
                "setup": f"llama.cpp, {threads} thread{'s' if threads > 1 else ''}",
                **_measure(generate, [psutil.Process()]),
            }
        )
    return rows


def _not_built(exc: ImportError) -> str:
    if not LLAMA_LOG.is_file():
        return f"not built: llama-cpp-python not installed ({exc}); `make bench` builds it"
    lines = LLAMA_LOG.read_text(errors="replace").splitlines()
    if lines and lines[-1] == "exit status 124":
        return "not built: compiling llama-cpp-python took over the time limit in `make bench`"
    errors = [line.strip() for line in lines if "error" in line.lower()]
    return f"not built: {(errors or lines[-1:] or ['no output'])[0][:200]} (see {LLAMA_LOG})"


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    folders = {name: imported_smollm2(q) for name, q in QUANTIZATIONS.items()}
    for name, folder in folders.items():
        for threads in (1, None):
            rows.append(_whole_rows(name, folder, threads))
    rows += _llama_rows()
    rows += [_stage_memory(name, folder) for name, folder in folders.items()]
    speed = json.dumps(asdict(measure_throughput(1)))
    for name, folder in folders.items():
        for nodes in (1, 2, 3):
            concurrent = name == "float32" and nodes < 3
            rows += _mesh_rows(name, folder, nodes, speed, concurrent)
    return rows


def _verdict(value: float, target: float) -> str:
    return f"{value:.2f}x (target >= {target}x) {'PASS' if value >= target else 'MISS'}"


def _per_stage(fp32: list[float | None], int4: list[float | None]) -> str:
    """The smallest float32/int4 ratio over the stages both measured, and each ratio."""
    ratios = [a / b for a, b in zip(fp32, int4, strict=True) if a and b]
    listed = ", ".join(f"{r:.1f}" for r in ratios)
    return f"{_verdict(min(ratios), 3)} (stages: {listed})" if ratios else "not measured"


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets as ratios of this run, and where a mesh token's time goes."""

    def row(model: str, setup: str, sessions: int | None = None) -> dict[str, Any]:
        return next(
            r
            for r in rows
            if r["model"] == model
            and r["setup"] == setup
            and (sessions is None or r.get("sessions") == sessions)
        )

    whole = max(
        (r for r in rows if r["model"] == "float32" and r["setup"].startswith("whole")),
        key=lambda r: r["decode_tok_s"],
    )
    mesh = {n: row("float32", _mesh_label(n), 1) for n in (1, 2, 3)}
    one_4 = row("float32", _mesh_label(1), 4)
    two_4 = row("float32", _mesh_label(2), 4)
    split = {r["model"]: r for r in rows if "stage_session_rss_mb" in r}
    return {
        "1 session on 2 nodes, decode vs the whole model "
        f"({whole['setup']}, {whole['decode_tok_s']} tok/s)": _verdict(
            mesh[2]["decode_tok_s"] / whole["decode_tok_s"], 0.8
        ),
        "4 sessions on 2 single-thread nodes vs on 1, aggregate tok/s": _verdict(
            two_4["aggregate_tok_s"] / one_4["aggregate_tok_s"], 1.6
        ),
        "float32 / int4 fragment weights per stage, 3 balanced stages": _per_stage(
            split["float32"]["stage_weights_mb"], split["int4"]["stage_weights_mb"]
        ),
        "float32 / int4 session RSS per stage, 3 balanced stages": _per_stage(
            split["float32"]["stage_session_rss_mb"], split["int4"]["stage_session_rss_mb"]
        ),
        **{
            f"where a decode token's time goes ({model})": _time_per_token(row, model)
            for model in QUANTIZATIONS
        },
        "4 sessions, 1 node / 2 nodes: cores the nodes kept busy, of 2": [
            one_4["node_cores"],
            two_4["node_cores"],
        ],
        "4 sessions, 1 node / 2 nodes: cores other processes took meanwhile": [
            one_4["other_cores"],
            two_4["other_cores"],
        ],
    }


def _time_per_token(row: Callable[..., dict[str, Any]], model: str) -> dict[str, Any]:
    """A mesh token's time against the whole model's (1 thread): what is outside the
    sessions, what one more network hop adds, and the CPU every process spends on it."""
    whole = row(model, "whole model, 1 session, 1 thread")
    mesh = {n: row(model, _mesh_label(n), 1) for n in (1, 2, 3)}
    inside = 1000 / whole["decode_tok_s"]
    ms = {n: 1000 / mesh[n]["decode_tok_s"] for n in mesh}
    return {
        "whole model, 1 thread: ms per token, all in the session": round(inside, 2),
        **{
            f"mesh, {n} node(s): ms per token, of which outside the sessions": (
                f"{ms[n]:.2f}, {ms[n] - inside:.2f}"
            )
            for n in mesh
        },
        "per network hop, ms (on n >= 2 nodes a token crosses n hops)": {
            n: round((ms[n] - ms[1]) / n, 2) for n in (2, 3)
        },
        "CPU ms per token, all processes: whole model, mesh on 1, 2, 3 nodes": [
            whole["cpu_ms_per_token"],
            *(mesh[n]["cpu_ms_per_token"] for n in mesh),
        ],
    }
