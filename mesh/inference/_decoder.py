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

from ...runtime import ModelSession, TensorSpec
from ._sampling import Sampling, sample

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def is_decoder(session: ModelSession) -> bool:
    return any(_PAST.match(spec.name) for spec in session.inputs)


def _empty(spec: TensorSpec) -> np.ndarray:
    """A cache of no tokens: [batch 1, heads, 0, head size]."""
    shape = [d if isinstance(d, int) and d >= 0 else 1 for d in spec.shape]
    shape[2] = 0
    return np.zeros(shape, dtype=spec.dtype or np.float32)


@dataclass(frozen=True)
class DecoderStage:
    session: ModelSession

    @property
    def pasts(self) -> list[TensorSpec]:
        return [spec for spec in self.session.inputs if _PAST.match(spec.name)]

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs this stage (all its layers, keys and values)."""
        total = 0
        for spec in self.pasts:
            dims = [d for i, d in enumerate(spec.shape) if i not in (0, 2)]
            if not all(isinstance(d, int) and d > 0 for d in dims):
                raise ValueError(f"{spec.name} has no fixed head shape: {spec.shape}")
            total += int(np.prod(dims)) * (spec.dtype or np.dtype(np.float32)).itemsize
        return total

    def run(
        self,
        tensors: dict[str, np.ndarray],
        cache: dict[str, np.ndarray] | None,
        sampling: Sampling | None,
        step: int,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(what goes on, the new cache). Blocking: run it in a worker thread."""
        feeds = {s.name: tensors[s.name] for s in self.session.inputs if s.name in tensors}
        for spec in self.pasts:
            feeds[spec.name] = cache[spec.name] if cache else _empty(spec)
        outputs = self.session.run(feeds)
        presents = {}
        for spec in self.pasts:
            match = _PAST.match(spec.name)
            assert match is not None
            presents[spec.name] = outputs.pop(f"present.{match[1]}.{match[2]}")
        if "logits" in outputs and sampling is not None:
            token = sample(outputs.pop("logits")[0, -1], sampling, step)
            outputs = {"token": np.array([token], dtype=np.int64)}
        return outputs, presents
