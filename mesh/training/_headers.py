"""The schema of every frame on ``/salala/train/1.0.0``, checked where it arrives.

Stage-bound frames carry the slot they are for (job, attempt, stage, replica) and the
driver to answer; driver-bound frames carry the slot they come from. Job ids become
checkpoint folder names on every stage's node, so they are single path components.
"""

from ..wire import (
    NAME,
    PEER_ID,
    SHA256,
    TENSORS,
    Check,
    array,
    choice,
    flag,
    integer,
    mapping,
    nullable,
    number,
    opaque,
    record,
    tagged,
    text,
    where,
)

MAX_STAGES = 64
MAX_REPLICAS = 64
MAX_ATTEMPTS = 16
MAX_STEPS = 1 << 31

JOB = NAME
ATTEMPT = integer(0, MAX_ATTEMPTS - 1)
STAGE = integer(0, MAX_STAGES - 1)
REPLICA = integer(0, MAX_REPLICAS - 1)
STEP = integer(0, MAX_STEPS)
MICRO_BATCH = integer(0, 1 << 20)
COUNT = integer(0, 1 << 40)
OPTIMIZER = mapping(
    choice(["kind", "lr", "momentum", "betas", "eps"]),
    lambda value, path: (
        choice(["sgd", "adam"])(value, path)
        if isinstance(value, str)
        else array(number(-1e9, 1e9), 2)(value, path)
        if isinstance(value, list)
        else number(-1e9, 1e9)(value, path)
    ),
    5,
)

_SLOT: dict[str, Check] = {
    "job": JOB,
    "attempt": ATTEMPT,
    "driver": PEER_ID,
    "stage": STAGE,
    "replica": REPLICA,
    "tensors": TENSORS,
}


def _kind(name: str) -> dict[str, Check]:
    return {"kind": choice([name])}


def _carrying(names: set[str], schema: Check, kind: str) -> Check:
    return where(
        schema,
        lambda h: {t["name"] for t in h["tensors"]} == names,
        f"a {kind} frame carries exactly the tensors {', '.join(sorted(names))}",
    )


SETUP = where(
    record(
        {
            **_kind("setup"),
            **_SLOT,
            "stages": integer(1, MAX_STAGES),
            "forward": SHA256,
            "forward_bytes": integer(1, 1 << 40),
            "backward": SHA256,
            "backward_bytes": integer(1, 1 << 40),
            "optimizer": OPTIMIZER,
            "optimizer_steps": STEP,
            "next": nullable(PEER_ID),
            "prev": nullable(PEER_ID),
            "replicas": array(PEER_ID, MAX_REPLICAS, 1),
        }
    ),
    lambda h: h["stage"] < h["stages"] and h["replica"] < len(h["replicas"]),
    "the stage and replica must lie inside the job",
)
_PASS = {**_SLOT, "step": STEP, "mb": MICRO_BATCH}
FORWARD = _carrying({"x", "labels"}, record({**_kind("fwd"), **_PASS}), "fwd")
BACKWARD = _carrying({"grad_y"}, record({**_kind("bwd"), **_PASS}), "bwd")
_STEP = {**_SLOT, "stages": integer(1, MAX_STAGES), "step": STEP, "checkpoint": flag}
STEP_FRAME = record({**_kind("step"), **_STEP})
GRADS = record({**_kind("grads"), **_STEP, "sender": REPLICA, "samples": COUNT})
END = record({**_kind("end"), "job": JOB, "tensors": TENSORS})

# Frames to the driver name the slot they come from, as the stage read it.
_FROM: dict[str, Check] = {
    "job": JOB,
    "attempt": nullable(ATTEMPT),
    "stage": nullable(STAGE),
    "replica": nullable(REPLICA),
    "peer": PEER_ID,
    "tensors": TENSORS,
}
READY = record({**_kind("ready"), **_FROM})
LOSS = record(
    {**_kind("loss"), **_FROM, "loss": opaque(float), "samples": COUNT, "mb": MICRO_BATCH}
)
DONE = record({**_kind("done"), **_FROM, "mb": MICRO_BATCH})
STEPPED = record({**_kind("stepped"), **_FROM, "step": STEP, "optimizer_steps": STEP})
FAILED = record({**_kind("error"), **_FROM, "message": text(4096)}, {"unreachable": PEER_ID})

TRAIN_FRAME = tagged(
    "kind",
    {
        "setup": SETUP,
        "fwd": FORWARD,
        "bwd": BACKWARD,
        "step": STEP_FRAME,
        "grads": GRADS,
        "end": END,
        "ready": READY,
        "loss": LOSS,
        "done": DONE,
        "stepped": STEPPED,
        "error": FAILED,
    },
)
