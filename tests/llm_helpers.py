"""The SmolLM2 import cache and greedy loop; they live in ``bench/_smollm2.py`` so that
``bench/generation.py`` and the tests share one cache and one reference loop."""

from bench._smollm2 import (
    MODEL_NAME,
    SPLIT_VERSION,
    card_of,
    empty_past,
    greedy_tokens,
    imported_smollm2,
    next_feeds,
    smollm2_gguf,
)

__all__ = [
    "MODEL_NAME",
    "SPLIT_VERSION",
    "card_of",
    "empty_past",
    "greedy_tokens",
    "imported_smollm2",
    "next_feeds",
    "smollm2_gguf",
]
