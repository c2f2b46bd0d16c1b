"""The ``salala`` command line: rich tables for people, ``--json`` for scripts."""

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from ._client import connect
from ._errors import NodeNotRunningError, SalalaError
from ._paths import resolve_data_dir

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Salala: idle devices running models together.",
)
node_app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_enable=False, help="Run and inspect this device's node."
)
models_app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_enable=False, help="Models stored on this node."
)
app.add_typer(node_app, name="node")
app.add_typer(models_app, name="models")

console = Console()
DataDirOption = Annotated[
    Optional[Path],  # noqa: UP045 - typer reads the annotation at run time
    typer.Option("--data-dir", help="Node state folder [default: $SALALA_HOME or user data dir]"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _human_bytes(count: float | None) -> str:
    if count is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return "?"


@node_app.command("start")
def node_start(
    data_dir: DataDirOption = None,
    listen: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--listen", help="libp2p listen multiaddr (repeatable)."),
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="Threads per model session.")] = None,  # noqa: UP045
    max_request_mb: Annotated[int, typer.Option(help="Largest API request accepted.")] = 1024,
) -> None:
    """Run this device's node in the foreground (Ctrl-C stops it)."""
    import trio

    from ._daemon import DEFAULT_LISTEN, NodeConfig, run_node

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("salala").setLevel(logging.INFO)
    config = NodeConfig(
        data_dir=resolve_data_dir(data_dir),
        listen=listen or [DEFAULT_LISTEN],
        threads=threads,
        max_request_bytes=max_request_mb << 20,
    )
    trio.run(run_node, config)


@node_app.command("status")
def node_status(
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
    wait: Annotated[float, typer.Option(help="Wait up to this many seconds for the node.")] = 0,
) -> None:
    """Identity, addresses and capacity of the running node."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with connect(data_dir) as node:
                status = node.status()
            break
        except NodeNotRunningError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    if as_json:
        _print_json(status)
        return
    capacity = status["capacity"]
    table = Table(title=f"Salala node {status['short_id']}", show_header=False)
    table.add_row("peer id", status["peer_id"])
    table.add_row("listening", "\n".join(status["addrs"]))
    table.add_row("data dir", status["data_dir"])
    table.add_row(
        "cores", f"{capacity['physical_cores']} physical / {capacity['logical_cores']} logical"
    )
    table.add_row(
        "memory free",
        f"{_human_bytes(capacity['memory_available'])} of {_human_bytes(capacity['memory_total'])}",
    )
    table.add_row("load (1 min)", str(capacity["load_1m"]))
    battery = capacity["battery_percent"]
    table.add_row(
        "battery",
        "none"
        if battery is None
        else f"{battery:.0f}% {'charging' if capacity['charging'] else 'on battery'}",
    )
    table.add_row("providers", ", ".join(capacity["providers"]))
    table.add_row("measured", f"{capacity['gflops']} GFLOP/s")
    table.add_row("models", str(status["models"]))
    console.print(table)


@node_app.command("stop")
def node_stop(data_dir: DataDirOption = None) -> None:
    """Ask the running node to stop."""
    with connect(data_dir) as node:
        node.shutdown()
    console.print("node stopping")


@models_app.command("list")
def models_list(data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """Models this node holds."""
    with connect(data_dir) as node:
        stored = node.models()
    if as_json:
        _print_json(stored)
        return
    table = Table(title="Models")
    for column in ("name", "sha256", "size"):
        table.add_column(column)
    for model in stored:
        table.add_row(model["name"], model["sha256"][:12], _human_bytes(model["size"]))
    console.print(table)


@models_app.command("add")
def models_add(
    path: Path,
    name: Annotated[Optional[str], typer.Option(help="Name [default: file stem].")] = None,  # noqa: UP045
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Import an ONNX file into the node's store."""
    with connect(data_dir) as node:
        stored = node.add_model(path, name)
    if as_json:
        _print_json(stored)
    else:
        console.print(
            f"added [bold]{stored['name']}[/] "
            f"({stored['sha256'][:12]}, {_human_bytes(stored['size'])})"
        )


@models_app.command("split")
def models_split(
    name: str,
    parts: Annotated[int, typer.Option(help="Number of fragments.")] = 2,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cut a model into contiguous fragments of balanced cost."""
    with connect(data_dir) as node:
        plan = node.split_model(name, parts)
    if as_json:
        _print_json(plan)
        return
    table = Table(title=f"{name} in {parts} fragments")
    for column in ("#", "inputs", "outputs", "GFLOPs", "weights", "file"):
        table.add_column(column)
    for fragment in plan["fragments"]:
        table.add_row(
            str(fragment["index"]),
            ", ".join(fragment["inputs"]),
            ", ".join(fragment["outputs"]),
            f"{fragment['flops'] / 1e9:.3f}",
            _human_bytes(fragment["weight_bytes"]),
            fragment["path"],
        )
    console.print(table)


def _print_tensors(outputs: dict[str, np.ndarray]) -> None:
    table = Table(title="Outputs")
    for column in ("name", "dtype", "shape", "first values"):
        table.add_column(column)
    for name, value in outputs.items():
        head = np.array2string(value.reshape(-1)[:6], precision=4, separator=", ")
        table.add_row(name, str(value.dtype), str(list(value.shape)), head)
    console.print(table)


def _run_text(
    node_name: str, model: str, texts: list[str], data_dir: Path | None, as_json: bool
) -> None:
    from ..models import encode_texts, sentence_embeddings

    inputs = encode_texts(texts)
    with connect(data_dir) as node:
        outputs = node.infer(model, inputs)
    embeddings = sentence_embeddings(outputs["last_hidden_state"], inputs["attention_mask"])
    cosine = float(embeddings[0] @ embeddings[1]) if len(texts) == 2 else None
    if as_json:
        _print_json(
            {"model": model, "texts": texts, "embeddings": embeddings.tolist(), "cosine": cosine}
        )
        return
    table = Table(title=f"{model}: sentence embeddings ({embeddings.shape[1]} dims)")
    table.add_column("text")
    table.add_column("embedding (first 6 of unit vector)")
    for text, vector in zip(texts, embeddings, strict=True):
        table.add_row(text, np.array2string(vector[:6], precision=4, separator=", "))
    console.print(table)
    if cosine is not None:
        console.print(f"cosine similarity: [bold]{cosine:.4f}[/]")


@app.command("run")
def run(
    model: str,
    input_file: Annotated[Optional[Path], typer.Option("--input", help="Inputs as .npz.")] = None,  # noqa: UP045
    text: Annotated[Optional[list[str]], typer.Option(help="Text to embed (repeatable).")] = None,  # noqa: UP045
    output: Annotated[Optional[Path], typer.Option(help="Write outputs to this .npz.")] = None,  # noqa: UP045
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a model on the local node, from an .npz of inputs or from text."""
    if (input_file is None) == (not text):
        raise typer.BadParameter("give either --input FILE.npz or --text")
    if text:
        _run_text("node", model, text, data_dir, as_json)
        return
    assert input_file is not None
    with np.load(input_file, allow_pickle=False) as archive:
        inputs = {name: archive[name] for name in archive.files}
    with connect(data_dir) as node:
        outputs = node.infer(model, inputs)
    if output is not None:
        np.savez(output, **outputs)  # type: ignore[arg-type]  # numpy's stub types **kwds badly
    if as_json:
        _print_json(
            {
                name: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.tolist()}
                for name, v in outputs.items()
            }
        )
    else:
        _print_tensors(outputs)


def main() -> None:
    try:
        app()
    except SalalaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
