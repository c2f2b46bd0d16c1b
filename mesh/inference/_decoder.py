"""One step of a decoder stage: its layers' caches in, the new tokens' states out.

A fragment of a causal language model takes ``past_key_values.{i}.key/value`` for each
of its layers and returns ``present.{i}.key/value`` (the past plus the new tokens).
The presents stay here, in the session's cache; everything else it outputs (the hidden
states of the new tokens, or on the last stage the logits) goes on. The last stage
samples, so only a token id leaves it.
"""

import re
from dataclasses import dataclass

import numpy as np

from ...models import LlmCard
from ...runtime import ModelSession
from ._sampling import Sampling, sample

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def is_decoder(session: ModelSession) -> bool:
    return any(_PAST.match(spec.name) for spec in session.inputs)


@dataclass(frozen=True)
class DecoderStage:
    """A decoder fragment with its model's card (which fixes the cache's head shape:
    graphs leave it symbolic)."""

    session: ModelSession
    card: LlmCard

    @property
    def pasts(self) -> list[str]:
        return [spec.name for spec in self.session.inputs if _PAST.match(spec.name)]

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
        presents = {}
        for name in self.pasts:
            match = _PAST.match(name)
            assert match is not None
            presents[name] = outputs.pop(f"present.{match[1]}.{match[2]}")
        if "logits" in outputs and sampling is not None:
            token = sample(outputs.pop("logits")[0, -1], sampling, step)
            outputs = {"token": np.array([token], dtype=np.int64)}
        return outputs, presents
