"""The schema of every message on the inference protocols.

``/salala/infer/1.0.0`` carries frames of three kinds (the stage work, the result, a
stage's refusal); ``/salala/deploy/1.0.0`` a request to host a stage and the host's
progress and verdict. Each is checked in full where it arrives, before anything reads
it (see ``wire._schema``).
"""

from ..membership import DEPLOYMENT, SERVING_ENTRY
from ..wire import (
    PEER_ID,
    TENSOR_NAME,
    TENSORS,
    array,
    choice,
    flag,
    integer,
    nullable,
    number,
    record,
    row,
    tagged,
    text,
    where,
)

MAX_STAGES = 64
MAX_ATTEMPTS = 8
REQUEST_ID = text(32, r"[0-9a-f]{32}")
ATTEMPT = integer(0, MAX_ATTEMPTS - 1)
STAGE = integer(0, MAX_STAGES - 1)
# Why a stage refused a request; the router replays the retryable ones elsewhere.
REFUSALS = (
    "bad_request",
    "too_large",
    "not_hosted",
    "invalid_input",
    "unreachable",
    "internal",
    "cache_miss",  # a decoder stage holds no cache of the length the step assumes
    "cache_full",  # a decoder stage has no room for another session's cache
    "unavailable",  # its owner's policy keeps the member from new work (unplugged, say)
)
TRACE = array(row(STAGE, PEER_ID, number(0, 1e9)), MAX_STAGES)
MAX_CONTEXT = 1 << 20
# A step of a generation session through a decoder's stages: how many tokens each
# stage's cache must already hold, and how the last stage samples the next token.
GEN = where(
    record(
        {
            "sid": text(32, r"[0-9a-f]{32}"),
            "past": integer(0, MAX_CONTEXT),
            "step": integer(0, MAX_CONTEXT),
            "temperature": number(0.0, 2.0),
            "top_p": number(0.0, 1.0),
            "top_k": integer(0, 1 << 20),
            "seed": integer(0, (1 << 63) - 1),
        },
        {"release": flag},  # the session has ended: stages drop its cache
    ),
    lambda g: g["top_p"] > 0.0,
    "top_p must be above 0",
)

INFER = where(
    record(
        {
            "kind": choice(["infer"]),
            "rid": REQUEST_ID,
            "attempt": ATTEMPT,
            "dep": DEPLOYMENT,
            "stage": STAGE,
            "route": array(PEER_ID, MAX_STAGES, 1),
            "reply": PEER_ID,
            "downstream": array(array(TENSOR_NAME, 256), MAX_STAGES, 1),
            "trace": TRACE,
            "tensors": TENSORS,
        },
        {"gen": GEN},
    ),
    lambda h: h["stage"] < len(h["route"]) == len(h["downstream"]),
    "the stage must lie inside the route, with the inputs of every stage",
)
RESULT = record(
    {
        "kind": choice(["result"]),
        "rid": REQUEST_ID,
        "attempt": ATTEMPT,
        "trace": TRACE,
        "tensors": TENSORS,
    }
)
REFUSAL = record(
    {
        "kind": choice(["error"]),
        "rid": REQUEST_ID,
        "attempt": nullable(ATTEMPT),
        "code": choice(REFUSALS),
        "message": text(4096),
        "peer": PEER_ID,
        "tensors": TENSORS,
    },
    {"unreachable": PEER_ID, "field": text(256)},
)
INFER_FRAME = tagged("kind", {"infer": INFER, "result": RESULT, "error": REFUSAL})

HOST_REQUEST = record({"entry": SERVING_ENTRY, "sources": array(PEER_ID, 256, 1)})
HOST_REPLY = where(
    record(
        {},
        {
            "progress": record({"bytes": integer(0, 1 << 50), "total": integer(0, 1 << 50)}),
            "ok": flag,
            "error": text(4096),
            "field": text(256),
        },
    ),
    lambda r: "progress" in r or "ok" in r,
    "a reply reports progress or a verdict",
)
