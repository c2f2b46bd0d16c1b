"""One step of a decoder stage: its layers' caches in, the new tokens' states out.

A fragment of a causal language model takes a past key and value for each of its layers
and returns their presents (the past plus the new tokens), named as the model's card
says (``past_key_values.{i}.key`` and ``present.{i}.key`` for onnxruntime-genai's).
The presents stay here, in the session's cache; everything else it outputs (the hidden
states of the new tokens, or on the last stage the logits) goes on. The last stage
samples, so only a token id leaves it.
"""

from dataclasses import dataclass

import numpy as np

from ...models import LlmCard
from ...runtime import ModelSession
from ._sampling import Sampling, sample


@dataclass(frozen=True)
class DecoderStage:
    """A decoder fragment with its model's card (which fixes the cache's head shape:
    graphs leave it symbolic)."""

    session: ModelSession
    card: LlmCard

    @property
    def cache_names(self) -> dict[str, str]:
        """past input -> present output, for the layers this fragment holds (the card
        names them; a fragment takes only its own layers' pasts)."""
        inputs = {spec.name for spec in self.session.inputs}
        pairs = {}
        for layer in range(self.card.num_layers):
            for past, present in zip(
                self.card.past_names(layer), self.card.present_names(layer), strict=True
            ):
                if past in inputs:
                    pairs[past] = present
        return pairs

    @property
    def pasts(self) -> list[str]:
        return list(self.cache_names)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs this stage (all its layers, keys and values)."""
        itemsize = np.dtype(self.card.kv_dtype).itemsize
        return len(self.pasts) * self.card.num_kv_heads * self.card.head_dim * itemsize

    def empty_cache(self) -> dict[str, np.ndarray]:
        """A cache of no tokens: [batch 1, KV heads, 0, head size] per past input."""
        shape = (1, self.card.num_kv_heads, 0, self.card.head_dim)
        return {name: np.zeros(shape, dtype=self.card.kv_dtype) for name in self.pasts}

    def run(
        self,
        tensors: dict[str, np.ndarray],
        cache: dict[str, np.ndarray] | None,
        sampling: Sampling | None,
        step: int,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(what goes on, the new cache). Blocking: run it in a worker thread."""
        feeds = {s.name: tensors[s.name] for s in self.session.inputs if s.name in tensors}
        feeds.update(cache or self.empty_cache())
        outputs = self.session.run(feeds)
        presents = {past: outputs.pop(present) for past, present in self.cache_names.items()}
        if "logits" in outputs and sampling is not None:
            token = sample(outputs.pop("logits")[0, -1], sampling, step)
            outputs = {"token": np.array([token], dtype=np.int64)}
        return outputs, presents
