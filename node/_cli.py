"""The ``salala`` command line: rich tables for people, ``--json`` for scripts."""

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if sys.version_info < (3, 11):  # pragma: no cover - trio installs the backport there
    from exceptiongroup import BaseExceptionGroup

from ._client import connect
from ._errors import ConfigError, NodeNotRunningError, SalalaError
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
mesh_app = typer.Typer(no_args_is_help=True, help="The mesh this node belongs to.")
app.add_typer(models_app, name="models")
app.add_typer(mesh_app, name="mesh")

console = Console()
DataDirOption = Annotated[
    Optional[Path],  # noqa: UP045 - typer reads the annotation at run time
    typer.Option("--data-dir", help="Node state folder [default: $SALALA_HOME or user data dir]"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


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
        typer.Option(
            "--listen",
            help="Listen multiaddr (repeatable) [default: all, port 0]; one ending in /tls "
            "(/ip4/0.0.0.0/tcp/4002/tls) places the direct link [default: libp2p's hosts].",
        ),
    ] = None,
    mesh_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--mesh-key", help="Join the mesh with this key (remembered)."),
    ] = None,
    peer: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--peer", help="A member's multiaddr with /p2p/ id (repeatable)."),
    ] = None,
    join: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--join", help="A join URI from `salala mesh invite`."),
    ] = None,
    interface: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--interface", help="mDNS on this interface (repeatable) [default: LAN]."),
    ] = None,
    no_mdns: Annotated[bool, typer.Option("--no-mdns", help="Do not use mDNS at all.")] = False,
    no_link: Annotated[
        bool,
        typer.Option("--no-link", help="No direct TLS links: every frame over libp2p."),
    ] = False,
    threads: Annotated[Optional[int], typer.Option(help="Threads per model session.")] = None,  # noqa: UP045
    max_request_mb: Annotated[int, typer.Option(help="Largest API request accepted.")] = 1024,
    max_tensor_mb: Annotated[
        int, typer.Option(help="Largest set of tensors one inference may send between peers.")
    ] = 256,
    max_store_gb: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            help="Quota of the model store in GB; unused fragments are evicted to stay "
            "under it [default: what it holds plus half the disk's free space at start]."
        ),
    ] = None,
    max_memory_mb: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Memory this node lends to stages and their caches [default: what is free]."
        ),
    ] = None,
    kv_cache_mb: Annotated[
        int, typer.Option(help="Memory for generation sessions' key/value caches.")
    ] = 1024,
    only_while_charging: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--only-while-charging/--on-battery-too",
            help="Take work only while the battery charges [default: config.toml, else no].",
        ),
    ] = None,
    min_battery: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Take no work below this battery percentage, unless charging."),
    ] = None,
    max_battery_temp: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Take no work while the battery is hotter than this (°C)."),
    ] = None,
    quiet_hours: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="HH:MM-HH:MM", help="Take no work in these local hours."),
    ] = None,
    max_cpu_percent: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Share of the cores to lend: fewer threads, and a rest between runs."),
    ] = None,
    http: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--http",
            metavar="HOST:PORT",
            help="Serve the OpenAI-compatible API here (loopback unless a key is set).",
        ),
    ] = None,
    http_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--http-key",
            envvar="SALALA_HTTP_KEY",
            help="API key clients send as 'Authorization: Bearer KEY'; needed beyond loopback.",
        ),
    ] = None,
) -> None:
    """Run this device's node in the foreground (Ctrl-C stops it)."""
    import trio

    from ..mesh import MeshError, parse_invite
    from ..models import GB
    from ._config import check_store_gb, load_file_config, policy_from, resolve_mesh_key
    from ._daemon import DEFAULT_LISTEN, NodeConfig, run_node
    from ._http import HttpSettings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("salala").setLevel(logging.INFO)
    resolved = resolve_data_dir(data_dir)
    resolved.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    file_config = load_file_config(resolved)
    peers = [*(peer or []), *file_config.peers]
    given_key = mesh_key
    if join:
        try:
            join_key, join_peers = parse_invite(join)
        except MeshError as exc:
            raise ConfigError(f"--join: {exc}") from exc
        given_key, peers = str(join_key), [*peers, *join_peers]
    store_gb = check_store_gb(max_store_gb) or file_config.max_store_gb
    http_listen = http or file_config.http.get("listen")
    http_key = http_key or file_config.http.get("key")
    policy = policy_from(
        file_config.policy,
        {
            "only_while_charging": only_while_charging,
            "min_battery_percent": min_battery,
            "max_battery_temperature": max_battery_temp,
            "quiet_hours": quiet_hours,
            "max_cpu_percent": max_cpu_percent,
            "max_memory_mb": max_memory_mb,
        }
    )
    config = NodeConfig(
        data_dir=resolved,
        mesh_key=resolve_mesh_key(resolved, given_key, file_config.mesh_key),
        listen=listen or file_config.listen or [DEFAULT_LISTEN],
        peers=peers,
        interfaces=interface or file_config.interfaces or None,
        mdns=not no_mdns and file_config.mdns is not False,
        threads=threads or policy.threads(os.cpu_count()),
        max_request_bytes=max_request_mb << 20,
        max_tensor_bytes=max_tensor_mb << 20,
        max_store_bytes=None if store_gb is None else max(1, int(store_gb * GB)),
        http=HttpSettings.parse(http_listen, http_key) if http_listen else None,
        max_memory_bytes=None if policy.max_memory_mb is None else policy.max_memory_mb << 20,
        kv_cache_bytes=kv_cache_mb << 20,
        direct_links=not no_link,
        policy=policy,
    )
    try:
        trio.run(run_node, config)
    except MeshError as exc:  # bad listen address, interface or peer address
        raise ConfigError(str(exc)) from exc
    except BaseExceptionGroup as group:  # the same, or a taken --http port, from a task
        refusals, others = group.split((MeshError, ConfigError))
        if refusals is None or others is not None:
            raise
        raise ConfigError("; ".join(str(e) for e in _leaves(refusals))) from group


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
    table.add_row("mesh", f"{status['mesh_id']} ({status['members']} members)")
    table.add_row("mDNS on", ", ".join(status["mdns_interfaces"]) or "off")
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


@models_app.command("gc")
def models_gc(data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """Remove stored objects that no named model and no live deployment uses."""
    with connect(data_dir) as node:
        result = node.gc_models()
    if as_json:
        _print_json(result)
        return
    for removed in result["removed"]:
        console.print(f"removed {removed['sha256'][:12]} ({_human_bytes(removed['size'])})")
    quota = "no quota" if result["quota"] is None else f"quota {_human_bytes(result['quota'])}"
    console.print(
        f"freed [bold]{_human_bytes(result['freed'])}[/] "
        f"({len(result['removed'])} objects, {len(result['plans'])} split plans); "
        f"kept {result['kept']} objects, {_human_bytes(result['used'])} used, {quota}"
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


@models_app.command("import-llm")
def models_import_llm(
    source: Path,
    name: Annotated[str, typer.Option("--name", help="Name to store the model under.")],
    quantize: Annotated[
        str, typer.Option("--quantize", help="none, int8 or int4 (weight-only MatMulNBits).")
    ] = "none",
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Import a language model (GGUF file or Hugging Face folder) as an ONNX decoder.

    The import runs here, not in the node (it needs the export extra); the result is
    added through the running node, or straight into its store when none runs.
    """
    import tempfile
    from contextlib import nullcontext

    from ..models import ModelError, ModelStore, build_llm, check_name, llm_card

    resolved = resolve_data_dir(data_dir)
    resolved.store.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        check_name(name)
        with (
            tempfile.TemporaryDirectory(prefix=".import-llm-", dir=resolved.store) as tmp,
            nullcontext() if as_json else console.status("importing") as status,
        ):

            def step(text: str) -> None:
                if status is not None:
                    status.update(f"{text} [dim]({time.monotonic() - started:.0f} s)[/]")

            model = build_llm(source, quantize, Path(tmp), step)
            step("storing")
            try:
                with connect(resolved.root) as node:
                    stored = node.add_model(model.resolve(), name)
            except NodeNotRunningError:
                stored = ModelStore(resolved.store).add(model, name).to_dict()
    except ModelError as exc:
        raise typer.BadParameter(str(exc)) from exc
    card = llm_card(Path(stored["path"]))
    result = {**stored, "card": card.to_dict() if card else None}
    if as_json:
        _print_json(result)
        return
    console.print(
        f"imported [bold]{stored['name']}[/] ({stored['sha256'][:12]}, "
        f"{_human_bytes(stored['size'])}, {quantize}) in {time.monotonic() - started:.0f} s"
    )
    if card is not None:
        console.print(
            f"{card.num_layers} layers, context {card.context_length} tokens, "
            f"{_human_bytes(card.kv_bytes_per_token())} of cache per token"
        )


@mesh_app.command("create")
def mesh_create(as_json: JsonOption = False) -> None:
    """Print a new mesh key. Start nodes with `--mesh-key KEY` to form the mesh."""
    from ..mesh import MeshKey

    key = MeshKey.generate()
    if as_json:
        _print_json({"mesh_key": str(key), "mesh_id": key.mesh_id})
    else:
        print(key)


@mesh_app.command("invite")
def mesh_invite(
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
    qr: Annotated[
        bool, typer.Option("--qr", help="Also print it as a QR code, for a phone's camera.")
    ] = False,
) -> None:
    """Print a join URI for this mesh (it holds the mesh key: share it like a password)."""
    with connect(data_dir) as node:
        invite = node.invite()
    if as_json:
        _print_json(invite)
        return
    print(invite["uri"])
    if qr:
        import segno

        # Two rows of modules per line of half blocks, light on dark as terminals draw.
        segno.make(invite["uri"], error="m").terminal(out=sys.stdout, compact=True)


def _ago(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f} s ago"


def _peers_table(peers: list[dict[str, Any]]) -> Table:
    table = Table(title=f"Mesh: {len(peers)} members")
    for column in (
        "id",
        "name",
        "takes work",
        "addresses",
        "cores",
        "free mem",
        "GFLOP/s",
        "providers",
        "battery",
        "load",
        "RTT",
        "link",
        "last seen",
    ):
        table.add_column(column)
    for peer in peers:
        capacity = peer["capacity"]
        providers = [p.removesuffix("ExecutionProvider") for p in capacity["providers"]]
        incompatible = "" if peer["compatible"] else f"\n[red]incompatible (v{peer['protocol']})[/]"
        table.add_row(
            peer["short_id"] + (" (this)" if peer["self"] else "") + incompatible,
            peer["name"],
            _works_cell(peer),
            "\n".join(a.split("/p2p/")[0] for a in peer["addrs"]),
            f"{capacity['physical_cores'] or '?'}/{capacity['logical_cores'] or '?'}",
            _human_bytes(capacity["memory_available"]),
            str(capacity["gflops"] or "?"),
            ",".join(providers),
            _battery_cell(capacity),
            "?" if capacity["load_1m"] is None else f"{capacity['load_1m']:.2f}",
            "-" if peer["self"] else (f"{peer['rtt_ms']:.1f} ms" if peer["rtt_ms"] else "?"),
            "-" if peer["self"] else _link_cell(peer["link"]),
            "now" if peer["self"] else _ago(peer["last_seen_s"]),
        )
    return table


def _works_cell(peer: dict[str, Any]) -> str:
    """Whether the member takes work; its reason is another member's text, so it is
    printed as text, never read as markup or terminal codes."""
    capacity = peer["capacity"]
    if not peer["compatible"]:
        return "?"
    if capacity["available"]:
        return "yes"
    reason = "".join(c if c.isprintable() else "?" for c in str(capacity["unavailable_reason"]))
    return f"[yellow]no: {escape(reason)}[/]"


def _battery_cell(capacity: dict[str, Any]) -> str:
    battery, hot = capacity["battery_percent"], capacity["battery_temperature"]
    if battery is None:
        return "-"
    charging = " ⚡" if capacity["charging"] else ""
    return f"{battery:.0f}%{charging}" + ("" if hot is None else f" {hot:.0f} °C")


def _link_cell(link: dict[str, Any] | None) -> str:
    """The path frames to a member take, its RTT and bandwidth, and why not direct."""
    if link is None:
        return "?"
    rtt = f"{link['rtt_ms']:.2f} ms" if link.get("rtt_ms") else "? ms"
    rate = f"{link['bandwidth'] / 1e6:.0f} MB/s" if link.get("bandwidth") else "? MB/s"
    cell = f"{link['path']}\n{rtt}, {rate}"
    if link.get("reason"):
        cell += f"\n[dim]{link['reason']}[/]"
    return cell


@mesh_app.command("peers")
def mesh_peers(data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """Every member with its capacity, RTT and when it was last heard from."""
    with connect(data_dir) as node:
        peers = node.peers()
    if as_json:
        _print_json(peers)
    else:
        console.print(_peers_table(peers))


@mesh_app.command("status")
def mesh_status(data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """This node's view of the mesh: id, members, reachable peers, discovery."""
    with connect(data_dir) as node:
        status = node.status()
        peers = node.peers()
    summary = {
        "mesh_id": status["mesh_id"],
        "peer_id": status["peer_id"],
        "addrs": status["addrs"],
        "mdns_interfaces": status["mdns_interfaces"],
        "members": len(peers),
        "connected": sum(1 for p in peers if p["connected"] and not p["self"]),
        "total_gflops": round(sum(p["capacity"]["gflops"] or 0 for p in peers), 2),
    }
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"Mesh {summary['mesh_id']}", show_header=False)
    table.add_row("this node", f"{status['short_id']} ({status['peer_id']})")
    table.add_row("members", str(summary["members"]))
    table.add_row("connected to", str(summary["connected"]))
    table.add_row("compute", f"{summary['total_gflops']} GFLOP/s in all")
    table.add_row("mDNS on", ", ".join(summary["mdns_interfaces"]) or "off")
    table.add_row("listening", "\n".join(summary["addrs"]))
    console.print(table)


@mesh_app.command("watch")
def mesh_watch(
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
) -> None:
    """A live view of the mesh until Ctrl-C (`--json`: one JSON line per refresh)."""
    from rich.live import Live

    # Ctrl-C ends the watch even when started from a shell that ignores SIGINT for
    # background jobs (Python would then inherit the ignore and never stop).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    with connect(data_dir) as node:
        try:
            if as_json:
                while True:
                    print(json.dumps(node.peers(), default=str), flush=True)
                    time.sleep(interval)
            with Live(_peers_table(node.peers()), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(_peers_table(node.peers()), refresh=True)
        except KeyboardInterrupt:
            pass


def _print_tensors(outputs: dict[str, np.ndarray]) -> None:
    table = Table(title="Outputs")
    for column in ("name", "dtype", "shape", "first values"):
        table.add_column(column)
    for name, value in outputs.items():
        head = np.array2string(value.reshape(-1)[:6], precision=4, separator=", ")
        table.add_row(name, str(value.dtype), str(list(value.shape)), head)
    console.print(table)


def _print_route(route: list[dict[str, Any]]) -> None:
    if not route:
        console.print("ran on this node (no deployment across the mesh)")
        return
    table = Table(title="Where each fragment ran")
    for column in ("stage", "peer", "compute ms"):
        table.add_column(column)
    for hop in route:
        table.add_row(str(hop["stage"]), hop["short_id"], f"{hop['ms']:.2f}")
    console.print(table)


def run_text(model: str, texts: list[str], data_dir: Path | None, as_json: bool) -> None:
    """Embed texts with a MiniLM-style model through the node and print the result."""
    from ..models import encode_texts, sentence_embeddings

    inputs = encode_texts(texts)
    with connect(data_dir) as node:
        outputs, route = node.infer_traced(model, inputs)
    embeddings = sentence_embeddings(outputs["last_hidden_state"], inputs["attention_mask"])
    cosine = float(embeddings[0] @ embeddings[1]) if len(texts) == 2 else None
    if as_json:
        _print_json(
            {
                "model": model,
                "texts": texts,
                "embeddings": embeddings.tolist(),
                "cosine": cosine,
                "route": route,
            }
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
    _print_route(route)


MaxTokensOption = Annotated[int, typer.Option("--max-tokens", help="Stop after this many.")]
TemperatureOption = Annotated[float, typer.Option(help="0 is greedy; up to 2.")]
TopPOption = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")]
TopKOption = Annotated[int, typer.Option("--top-k", help="0 turns top-k off.")]
SeedOption = Annotated[Optional[int], typer.Option(help="Repeatable sampling.")]  # noqa: UP045


@app.command("generate")
def generate(
    model: str,
    prompt: str,
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = 0.7,
    top_p: TopPOption = 0.9,
    top_k: TopKOption = 0,
    seed: SeedOption = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,  # noqa: UP045
    chat_template: Annotated[
        bool, typer.Option("--chat/--raw", help="Wrap the prompt in the chat template.")
    ] = True,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate text with a language model deployed in the mesh, streamed as it comes."""
    options: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": stop,
    }
    messages = [{"role": "user", "content": prompt}] if chat_template else None
    with connect(data_dir) as node:
        if as_json:
            result = node.generate(
                model, None if chat_template else prompt, messages=messages, stream=False, **options
            )
            _print_json(vars(result))
            return
        pieces = node.generate(
            model, None if chat_template else prompt, messages=messages, **options
        )
        for _ in _stream_chunks(pieces):
            pass


@app.command("chat")
def chat(
    model: str,
    system: Annotated[Optional[str], typer.Option(help="A system message.")] = None,  # noqa: UP045
    max_tokens: MaxTokensOption = 512,
    temperature: TemperatureOption = 0.7,
    top_p: TopPOption = 0.9,
    seed: SeedOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Chat with a language model deployed in the mesh; Ctrl-D or Ctrl-C leaves."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when the shell ignores it
    history: list[dict[str, str]] = []
    if system:
        history.append({"role": "system", "content": system})
    try:
        with connect(data_dir) as node:
            console.print(f"[dim]chatting with {model}; Ctrl-D or Ctrl-C leaves[/]")
            while True:
                try:
                    line = input("> ")
                except EOFError:
                    break
                if not line.strip():
                    continue
                history.append({"role": "user", "content": line})
                pieces = node.generate(
                    model,
                    messages=history,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                )
                answer = "".join(_stream_chunks(pieces))
                history.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:
        pass  # leaving is what Ctrl-C means here, at the prompt or mid-answer
    sys.stdout.write("\n")


def _stream_chunks(pieces: Any) -> Any:
    """Print pieces as they come, and pass them on."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        yield piece
    sys.stdout.write("\n")


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
        run_text(model, text, data_dir, as_json)
        return
    assert input_file is not None
    with np.load(input_file, allow_pickle=False) as archive:
        inputs = {name: archive[name] for name in archive.files}
    with connect(data_dir) as node:
        outputs, route = node.infer_traced(model, inputs)
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
        _print_route(route)


@app.command("deploy")
def deploy(
    model: str,
    shards: Annotated[str, typer.Option(help="Number of fragments, or 'auto'.")] = "auto",
    replicas: Annotated[int, typer.Option(help="Peers holding each fragment.")] = 1,
    codec: Annotated[
        str, typer.Option(help="Activations between stages: raw, fp16, int8.")
    ] = "raw",
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Split MODEL across the mesh by measured capacity and warm every stage."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    if shards != "auto" and not shards.isdigit():
        raise typer.BadParameter("--shards takes a number or 'auto'")
    count = None if shards == "auto" else int(shards)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        console=Console(stderr=True),
        disable=as_json,
    ) as bars:
        tasks: dict[tuple[int, str], Any] = {}

        def on_progress(event: dict[str, Any]) -> None:
            if "stage" not in event:
                return
            key = (event["stage"], event["peer"])
            if key not in tasks:
                label = f"stage {event['stage']} → {event['peer']}"
                tasks[key] = bars.add_task(label, total=event.get("total") or None)
            if event["state"] == "ready":
                total = bars.tasks[tasks[key]].total or 1
                bars.update(tasks[key], total=total, completed=total)
            else:
                bars.update(
                    tasks[key], total=event.get("total") or None, completed=event.get("bytes", 0)
                )

        with connect(data_dir) as node:
            result = node.deploy(model, count, replicas, codec, on_progress)
    if as_json:
        _print_json(result)
        return
    table = Table(title=f"{result['deployment']} ({result['codec']})")
    for column in ("stage", "fragment", "peers", "GFLOPs", "weights", "est. ms"):
        table.add_column(column)
    for stage in result["stages"]:
        table.add_row(
            str(stage["stage"]),
            stage["fragment"][:12],
            ", ".join(p[-8:] for p in stage["peers"]),
            f"{stage['flops'] / 1e9:.2f}",
            _human_bytes(stage["weight_bytes"]),
            f"{stage['estimated_ms']:.1f}",
        )
    console.print(table)
    for warning in result["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")


@app.command("undeploy")
def undeploy(model: str, data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """Remove MODEL's deployment from the whole mesh: every host unloads its stages."""
    with connect(data_dir) as node:
        result = node.undeploy(model)
    if as_json:
        _print_json(result)
        return
    if not result["deployments"]:
        console.print(
            f"no member advertises {result['model']} now; it is marked undeployed, so hosts "
            "that come back drop it"
        )
    else:
        console.print(
            f"undeployed [bold]{result['model']}[/] ({', '.join(result['deployments'])}) "
            f"from {', '.join(result['short_ids'])}"
        )
    if result["pending"]:
        waiting = ", ".join(p[-8:] for p in result["pending"])
        console.print(f"[yellow]still to confirm:[/] {waiting} (they drop it when they next sync)")


@app.command("train")
def train(
    job: Annotated[Path, typer.Argument(help="The job file (see README: Training).")],
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a model across the mesh as JOB.toml describes; prints loss as it goes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} samples/s"),
        console=Console(stderr=True),
        disable=as_json,
    ) as bars:
        bar = bars.add_task("training", total=None, loss=float("nan"), rate=0.0)

        def on_progress(event: dict[str, Any]) -> None:
            if event["event"] == "replanned":
                bars.console.print(
                    f"[yellow]lost {event['lost']}[/]: re-planned, resuming at step "
                    f"{event['resume_step']}"
                )
                bars.update(bar, completed=event["resume_step"])
                return
            bars.update(
                bar,
                total=event["steps"],
                completed=event["step"],
                loss=event["loss"],
                rate=event["samples_per_s"],
            )

        with connect(data_dir) as node:
            result = node.train(job, on_progress)
    if as_json:
        _print_json(result)
        return
    console.print(
        f"trained [bold]{result['model']}[/] in {result['steps']} steps: "
        f"final loss {result['loss'][-1]:.4f}, test accuracy {result['test_accuracy']:.2%}"
    )
    console.print(f"checkpoints: {result['checkpoints']}")
    console.print(f"deploy it with: salala deploy {result['model']}")


@models_app.command("export-digits")
def models_export_digits(
    folder: Path,
    fragments: Annotated[int, typer.Option(help="Training fragments (1 to 3).")] = 3,
) -> None:
    """Export the built-in digits MLP as a training package (needs torch: the export extra)."""
    from ..models import ModelError, export_digits

    try:
        export_digits(folder, fragments)
    except ModelError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except ImportError as exc:
        raise typer.BadParameter(
            f"exporting needs torch: pip install 'salala[export]' ({exc})"
        ) from exc
    console.print(f"training package written to {folder}")


@mesh_app.command("models")
def mesh_models(data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """Deployments in the mesh and where each fragment lives."""
    with connect(data_dir) as node:
        deployments = node.deployments()
    if as_json:
        _print_json(deployments)
        return
    table = Table(title="Deployments")
    for column in ("model", "deployment", "codec", "stage", "fragment", "held by"):
        table.add_column(column)
    for deployment in deployments:
        for stage in deployment["stages"]:
            table.add_row(
                deployment["model"],
                deployment["deployment"],
                deployment["codec"],
                str(stage["stage"]),
                stage["fragment"][:12],
                ", ".join(stage["short_ids"]) or "[red]nobody live[/]",
            )
    console.print(table)


@app.command("demo")
def demo(
    nodes: Annotated[int, typer.Option(help="Nodes to start on loopback.")] = 3,
    text: Annotated[Optional[list[str]], typer.Option(help="Texts to embed.")] = None,  # noqa: UP045
    root: Annotated[Optional[Path], typer.Option(help="Folder for the nodes' data.")] = None,  # noqa: UP045
    llm: Annotated[
        bool, typer.Option("--llm", help="Generate text with SmolLM2 instead of embedding.")
    ] = False,
    prompt: Annotated[str, typer.Option(help="What to ask SmolLM2 (with --llm).")] = (
        "Explain in two sentences why the sky is blue."
    ),
    quantize: Annotated[str, typer.Option(help="none, int8 or int4 (with --llm).")] = "int4",
) -> None:
    """Start a local mesh, shard a model across it (MiniLM, or SmolLM2 with --llm), stop."""
    from ._demo import run_demo, run_llm_demo

    if llm:
        run_llm_demo(nodes, prompt, quantize, root)
    else:
        run_demo(nodes, text or list(DEMO_TEXTS), root)


DEMO_TEXTS = ("A man is playing a guitar on stage.", "Someone performs music with a guitar.")


def main() -> None:
    try:
        app()
    except SalalaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
