"""Generating tokens through a decoder's stages: the requester's side.

The requester keeps the prompt and every token generated so far. Each step sends only
the new tokens (the whole prompt first, then one token at a time) along one route; each
stage extends its cache for the session, and the last stage samples the next token.
The session keeps its route while it works. When a stage dies, freezes or loses the
session's cache, the router's replay lands on a stage without that cache, which says
so; the session then starts afresh (a new session id) on a route avoiding the failed
peers, and replays what it had: the prompt in one pass, then each generated token in a
step of its own. Those are the very computations the first caches came from, so the
rebuilt caches hold the same bits; prefilling prompt and tokens in one pass would be
faster but is not exact where kernels differ by shape (an int4 model's MatMulNBits
gives other low bits for 40 rows than for 1, and greedy text then drifts). Replayed
steps' tokens are dropped, and sampling is seeded per step (see ``_sampling``), so the
caller's stream never repeats or drops a token, and greedy or seeded text equals an
undisturbed run's.
"""

import logging
import uuid
from collections.abc import AsyncGenerator, Collection
from typing import Any

import numpy as np
import trio

from .._errors import MeshError
from ._router import Router, StageRefusal
from ._sampling import Sampling

log = logging.getLogger(__name__)

MAX_RESTARTS = 8


class ContextLengthError(MeshError, ValueError):
    """The prompt does not leave room for a single new token in the model's context."""


class BadTokenError(MeshError):
    """The last stage answered with something that is not one token of the vocabulary."""


def _token(outputs: dict[str, np.ndarray], vocab_size: int) -> int:
    token = outputs.get("token")
    if token is None or token.shape != (1,) or token.dtype.kind not in "iu":
        raise BadTokenError(f"the last stage answered {sorted(outputs)} instead of one token")
    value = int(token[0])
    if not 0 <= value < vocab_size:
        raise BadTokenError(f"the last stage answered token {value}, outside the vocabulary")
    return value


async def generate_tokens(
    router: Router,
    model: str,
    prompt: list[int],
    *,
    max_tokens: int,
    context_length: int,
    vocab_size: int,
    sampling: Sampling,
    stop_tokens: Collection[int],
    position_ids: bool = False,
) -> AsyncGenerator[int, None]:
    """Yield generated token ids, ending after a stop token or ``max_tokens``."""
    if not prompt:
        raise ContextLengthError("the prompt is empty")
    if len(prompt) >= context_length:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens; {model}'s context holds {context_length}"
        )
    max_tokens = min(max_tokens, context_length - len(prompt))
    tokens = list(prompt)
    session, past, restarts = uuid.uuid4().hex, 0, 0
    avoid: set[str] = set()
    prefer: list[str] | None = None
    try:
        while len(tokens) - len(prompt) < max_tokens:
            # The prompt in one pass, then one token per step: on a replay too, so a rebuilt
            # cache holds exactly what the first one did (see the module docstring).
            fed = len(prompt) if past == 0 else past + 1
            gen: dict[str, Any] = {
                "sid": session,
                "past": past,
                "step": fed - len(prompt),
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
                "seed": sampling.seed,
            }
            inputs = {
                "input_ids": np.array([tokens[past:fed]], dtype=np.int64),
                "attention_mask": np.ones((1, fed), dtype=np.int64),
            }
            if position_ids:  # graphs that do not derive positions from the mask
                inputs["position_ids"] = np.arange(past, fed, dtype=np.int64)[None, :]
            try:
                outputs, trace = await router.infer(
                    model, inputs, gen=gen, avoid=avoid, prefer=prefer
                )
            except StageRefusal as exc:
                if exc.code != "cache_miss" or restarts == MAX_RESTARTS:
                    raise
                restarts += 1
                log.info("session %s lost a stage's cache; replaying it", session[:8])
                if prefer is not None:  # the stages still holding the lost session
                    with trio.CancelScope(shield=True):
                        await router.release(model, prefer, session)
                session, past, prefer = uuid.uuid4().hex, 0, None
                continue
            prefer = [str(hop[1]) for hop in trace]
            token = _token(outputs, vocab_size)
            past = fed
            if fed < len(tokens):
                continue  # replaying: this token was streamed already
            tokens.append(token)
            yield token
            if token in stop_tokens:
                return
    finally:
        if prefer is not None:  # the stages that hold this session's caches
            with trio.CancelScope(shield=True):
                await router.release(model, prefer, session)
