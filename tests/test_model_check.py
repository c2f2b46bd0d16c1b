"""The store's check of a model file reads protobuf itself (nodes run without onnx), so
it must find every external-data reference onnx would, and refuse garbage cleanly."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import minilm_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models_for_tests import linear_model
from onnx import TensorProto, helper, numpy_helper
from salala.models import InvalidModelError
from salala.models._validate import check_model_file

ESCAPE = "../outside.bin"


def _external(tensor: onnx.TensorProto, location: str) -> onnx.TensorProto:
    """Mark ``tensor`` as keeping its bytes in ``location`` (what onnx.save writes)."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "256")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _weight(name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones((8, 8), np.float32), name)


def _model(graph: onnx.GraphProto, functions: list[onnx.FunctionProto] | None = None) -> bytes:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=functions or [],
    )
    model.ir_version = 8
    return model.SerializeToString()


def _io() -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])
    return [x], [y]


def in_an_initializer() -> bytes:
    inputs, outputs = _io()
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph([node], "g", inputs, outputs, [_external(_weight("W"), ESCAPE)])
    return _model(graph)


def in_a_branch_of_an_if() -> bytes:
    """A Constant's tensor inside the then-branch of an If, two graphs deep."""
    inputs, outputs = _io()
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [8, 8])
    constant = helper.make_node("Constant", [], ["c"], value=_external(_weight("k"), ESCAPE))
    branch = helper.make_graph([constant], "then", [], [out])
    plain = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=_weight("z"))], "e", [], [out]
    )
    cond = helper.make_node(
        "Constant", [], ["cond"], value=helper.make_tensor("b", TensorProto.BOOL, [], [True])
    )
    choose = helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=plain)
    add = helper.make_node("Add", ["x", "c"], ["y"])
    return _model(helper.make_graph([cond, choose, add], "g", inputs, outputs))


def in_a_sparse_initializer() -> bytes:
    inputs, outputs = _io()
    values = _external(numpy_helper.from_array(np.ones(4, np.float32), "W"), ESCAPE)
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "W_idx")
    sparse = helper.make_sparse_tensor(values, indices, [8, 8])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        inputs,
        outputs,
        sparse_initializer=[sparse],
    )
    return _model(graph)


def in_a_local_function() -> bytes:
    inputs, outputs = _io()
    constant = helper.make_node("Constant", [], ["k"], value=_external(_weight("k"), ESCAPE))
    body = helper.make_function(
        "local",
        "AddK",
        ["a"],
        ["b"],
        [constant, helper.make_node("Add", ["a", "k"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    call = helper.make_node("AddK", ["x"], ["y"], domain="local")
    return _model(helper.make_graph([call], "g", inputs, outputs), [body])


@pytest.mark.parametrize(
    "build", [in_an_initializer, in_a_branch_of_an_if, in_a_sparse_initializer, in_a_local_function]
)
def test_external_data_outside_the_folder_is_found_wherever_the_tensor_sits(
    tmp_path: Path, build
) -> None:
    (tmp_path / "outside.bin").write_bytes(bytes(256))
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(build())
    with pytest.raises(InvalidModelError, match=r"outside the model's folder"):
        check_model_file(path)


def test_the_files_found_are_the_ones_onnx_names(tmp_path: Path) -> None:
    path = linear_model(tmp_path / "m" / "model.onnx", external=True, location="w/weights.bin")
    model = onnx.load(str(path), load_external_data=False)
    named = {
        (path.parent / entry.value).resolve()
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert check_model_file(path) == sorted(named) == [tmp_path / "m" / "w" / "weights.bin"]
    assert check_model_file(minilm_path()) == []  # weights inside the file


@pytest.fixture(scope="module")
def linear_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return linear_model(tmp_path_factory.mktemp("linear") / "m.onnx").read_bytes()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_damaged_files_are_refused_as_invalid_models_and_nothing_else(
    tmp_path: Path, linear_bytes: bytes, data: st.DataObject
) -> None:
    damaged = bytearray(linear_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    damaged = damaged[: data.draw(st.integers(1, len(damaged)))]
    path = tmp_path / "damaged.onnx"
    path.write_bytes(bytes(damaged))
    try:
        check_model_file(path)
    except InvalidModelError:
        pass
