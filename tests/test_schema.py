"""The wire's schemas, the deployment clock and the path lock: pure, no network."""

import os
from pathlib import Path

import pytest
from salala.mesh.inference._clock import MAX_JUMP, DeploymentClock
from salala.mesh.inference._headers import INFER_FRAME
from salala.mesh.training._headers import TRAIN_FRAME
from salala.mesh.wire import (
    NAME,
    SchemaError,
    array,
    integer,
    record,
    text,
    validate,
)
from salala.mesh.wire._frames import payload_size
from salala.models import PathEscapeError, inside

PEER = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"
RID = "ab" * 16
TENSOR = {"name": "x", "dtype": "float32", "shape": [2, 16], "codec": "raw", "sizes": [128]}


def infer(**changes: object) -> dict:
    return {
        "kind": "infer",
        "rid": RID,
        "attempt": 0,
        "dep": "m@3-abcdefgh",
        "stage": 0,
        "route": [PEER],
        "reply": PEER,
        "downstream": [["x"]],
        "trace": [],
        "tensors": [
            {"name": "x", "dtype": "float32", "shape": [2, 16], "codec": "raw", "sizes": [128]}
        ],
        **changes,
    }


def test_a_valid_frame_passes_whole() -> None:
    header = validate(infer(), INFER_FRAME)
    assert header == infer() and payload_size(header) == 128


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kind": "zip"}, "kind"),
        ({"kind": ["infer"]}, "kind"),  # unhashable where a name was due
        ({"tensors": [{**TENSOR, "codec": ["raw"]}]}, "tensors[0].codec"),
        ({"rid": 5}, "rid"),
        ({"route": [[PEER]]}, "route[0]"),
        ({"route": ["not-a-peer-id"]}, "route[0]"),
        ({"stage": 1}, ""),
        ({"attempt": True}, "attempt"),
        ({"dep": "../m@1-x"}, "dep"),
        ({"surprise": 1}, "surprise"),
        ({"tensors": [{"name": "x", "dtype": "object"}]}, "tensors[0].dtype"),
        (
            {
                "tensors": [
                    {"name": "x", "dtype": "int64", "shape": [2], "codec": "zip", "sizes": [16]}
                ]
            },
            "tensors[0].codec",
        ),
        (
            {
                "tensors": [
                    {"name": "x", "dtype": "int64", "shape": [-2], "codec": "raw", "sizes": [16]}
                ]
            },
            "tensors[0].shape[0]",
        ),
    ],
)
def test_every_bad_field_is_named(changes: dict, field: str) -> None:
    with pytest.raises(SchemaError) as caught:
        validate(infer(**changes), INFER_FRAME)
    assert caught.value.field == field
    assert caught.value.partial == infer(**changes)  # kept, to find whom to tell


@pytest.mark.parametrize(
    ("tensor", "field"),
    [
        ({"dtype": "float32", "shape": [2, 16], "codec": "raw", "sizes": [127]}, "sizes"),
        ({"dtype": "int64", "shape": [2, 16], "codec": "fp16", "sizes": [64]}, "codec"),
        ({"dtype": "float32", "shape": [16], "codec": "int8", "sizes": [16, 4, 32, 16]}, "codec"),
        # a product of dimensions that wraps around in 64 bits must not match small sizes
        ({"dtype": "uint8", "shape": [1 << 31] * 3, "codec": "raw", "sizes": [0]}, "sizes"),
    ],
)
def test_part_sizes_must_follow_from_dtype_shape_and_codec(tensor: dict, field: str) -> None:
    header = validate(infer(tensors=[{"name": "x", **tensor}]), INFER_FRAME)
    with pytest.raises(SchemaError) as caught:
        payload_size(header)
    assert caught.value.field == f"tensors[0].{field}"


def test_training_frames_declare_their_slot_and_names_that_become_paths() -> None:
    fwd = {
        "kind": "fwd",
        "job": "a1b2",
        "attempt": 0,
        "driver": PEER,
        "stage": 0,
        "replica": 0,
        "step": 3,
        "mb": 1,
        "tensors": [
            {"name": n, "dtype": "float32", "shape": [1, 9], "codec": "raw", "sizes": [36]}
            for n in ("x", "labels")
        ],
    }
    assert validate(fwd, TRAIN_FRAME) == fwd
    for job in ("..", "../x", "/abs", "a/b", ".hidden", "", "x" * 65):
        with pytest.raises(SchemaError) as caught:
            validate({**fwd, "job": job}, TRAIN_FRAME)
        assert caught.value.field == "job"
    with pytest.raises(SchemaError, match="exactly the tensors"):
        validate({**fwd, "tensors": fwd["tensors"][:1]}, TRAIN_FRAME)
    missing = {k: v for k, v in fwd.items() if k != "attempt"}
    with pytest.raises(SchemaError) as caught:
        validate(missing, TRAIN_FRAME)
    assert caught.value.field == "attempt"


def test_combinators_bound_everything() -> None:
    schema = record({"xs": array(integer(0, 9), 3), "name": text(4)}, {"opt": NAME})
    assert validate({"xs": [1, 2], "name": "ab"}, schema) == {"xs": [1, 2], "name": "ab"}
    for bad, field in [
        ({"xs": [1, 2, 3, 4], "name": "a"}, "xs"),
        ({"xs": [10], "name": "a"}, "xs[0]"),
        ({"xs": [], "name": "abcde"}, "name"),
        ({"xs": [], "name": "a", "opt": "."}, "opt"),
        ({"name": "a"}, "xs"),
        ([], ""),
    ]:
        with pytest.raises(SchemaError) as caught:
            validate(bad, schema)
        assert caught.value.field == field


def test_the_deployment_clock_is_lamport_and_refuses_absurd_jumps() -> None:
    clock = DeploymentClock()
    assert clock.tick() == 1
    assert clock.observe(40) and clock.tick() == 41  # newer than anything seen
    assert not clock.observe(41 + MAX_JUMP + 1) and clock.value == 41
    assert clock.observe(41 + MAX_JUMP) and clock.tick() == 42 + MAX_JUMP
    assert clock.observe(3) and clock.value == 42 + MAX_JUMP  # the past moves nothing


def test_writes_stay_inside_their_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    assert inside(root, "job", "stage-0.npz") == root / "job" / "stage-0.npz"
    for parts in (("..", "x"), ("/etc", "passwd"), ("a", "..", "..", "x"), (".",)):
        with pytest.raises(PathEscapeError):
            inside(root, *parts)
    os.symlink(tmp_path, root / "link")  # planted in the data dir, pointing out of it
    with pytest.raises(PathEscapeError):
        inside(root, "link", "x")
