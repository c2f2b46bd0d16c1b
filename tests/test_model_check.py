"""The store's check of a model file reads protobuf itself (nodes run without onnx), so
it must find every external-data reference onnx would, and refuse garbage cleanly."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
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


# ---- encodings a protobuf parser reads otherwise than they look ----------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int, *, key: int | None = None) -> bytes:
    tag = _varint(
        key if key is not None else number << 3 | (2 if isinstance(payload, bytes) else 0)
    )
    if isinstance(payload, bytes):
        return tag + _varint(len(payload)) + payload
    return tag + _varint(payload)


def _hidden(location: str = "hidden.bin") -> onnx.TensorProto:
    """A 4-byte uint8 tensor kept in ``location``, with no data_location field yet."""
    tensor = onnx.TensorProto(name="w", data_type=TensorProto.UINT8, dims=[4])
    for key, value in (("location", location), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _adds_initializer(tensor_bytes: bytes) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [4])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    graph_bytes = model.graph.SerializeToString() + _field(5, tensor_bytes)
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, graph_bytes)


def data_location_wider_than_an_enum() -> bytes:
    """data_location = 1 + 2**32: protobuf keeps the low 32 bits, EXTERNAL."""
    return _adds_initializer(_hidden().SerializeToString() + _field(14, 1 + 2**32))


def no_data_location_at_all() -> bytes:
    return _adds_initializer(_hidden().SerializeToString())


def a_tag_with_bits_above_32() -> bytes:
    """data_location's tag with a 33rd bit: protobuf cuts tags to 32 bits."""
    return _adds_initializer(_hidden().SerializeToString() + _field(0, 1, key=1 << 32 | 14 << 3))


def a_function_attributes_default() -> bytes:
    """A Constant in a local function whose tensor is the function attribute's default."""
    hidden = _hidden("hidden.bin")
    hidden.data_location = TensorProto.EXTERNAL
    function = onnx.FunctionProto(name="F", domain="custom", input=["x"], output=["y"])
    function.opset_import.extend([helper.make_opsetid("", 17)])
    constant = helper.make_node("Constant", [], ["c"])
    reference = constant.attribute.add()
    reference.name, reference.ref_attr_name, reference.type = (
        "value",
        "val",
        onnx.AttributeProto.TENSOR,
    )
    function.node.extend([constant, helper.make_node("Add", ["x", "c"], ["y"])])
    default = function.attribute_proto.add()
    default.name, default.type = "val", onnx.AttributeProto.TENSOR
    default.t.CopyFrom(hidden)
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [4])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [4])
    graph = helper.make_graph([helper.make_node("F", ["x"], ["y"], domain="custom")], "g", [x], [y])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10, functions=[function])
    return model.SerializeToString()


@pytest.mark.parametrize(
    "build",
    [
        data_location_wider_than_an_enum,
        no_data_location_at_all,
        a_tag_with_bits_above_32,
        a_function_attributes_default,
    ],
)
def test_every_file_onnxruntime_reads_is_one_the_check_names_or_it_refuses(
    tmp_path: Path, build
) -> None:
    """The check's list of external files is what the store copies and a node trusts;
    onnxruntime must never read bytes from a file missing from it."""
    (tmp_path / "hidden.bin").write_bytes(b"HIDN")
    path = tmp_path / "model.onnx"
    path.write_bytes(build())
    try:
        named = check_model_file(path)
    except InvalidModelError:
        return  # refused: nothing reaches onnxruntime
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        output = session.run(None, {"x": np.zeros(4, np.uint8)})[0]
    except Exception:  # onnxruntime refuses it too: it read nothing
        return
    if output.tobytes() == b"HIDN":
        assert tmp_path / "hidden.bin" in named
