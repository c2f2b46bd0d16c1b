"""Just enough of protobuf's wire format to read an ONNX file without the onnx package.

A node hosts fragments with onnxruntime alone (phones have no onnx wheel), but it must
still refuse a fragment whose external data points outside its folder before
onnxruntime reads it. That check needs only a few fields, so this walks the encoded
message and skips everything else by length, without copying weights.
"""

from collections.abc import Iterator

from ._errors import InvalidModelError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10

Field = tuple[int, int | memoryview]  # (field number, integer or the bytes it holds)


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    for offset in range(_MAX_VARINT_BYTES):
        if position + offset >= len(data):
            break
        byte = data[position + offset]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position + offset + 1
        shift += 7
    raise InvalidModelError(f"a varint at byte {position} is cut short or longer than 10 bytes")


def fields(data: memoryview) -> Iterator[Field]:
    """Each field of one encoded message, in order: numbers for varints, views for
    length-delimited fields; fixed-size fields are skipped.

    Protobuf parsers cut a tag to 32 bits, so a tag with higher bits set names a field
    other than the one it seems to: such tags are refused rather than guessed at.
    """
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        if key >> 32 or key >> 3 == 0:
            raise InvalidModelError(f"a field tag at byte {position} is out of range ({key})")
        number, kind = key >> 3, key & 7
        if kind == VARINT:
            value, position = _varint(data, position)
            yield number, value
        elif kind == LENGTH:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise InvalidModelError(
                    f"field {number} claims {length} bytes at byte {position}, past the end"
                )
            yield number, data[position : position + length]
            position += length
        elif kind in (FIXED64, FIXED32):
            position += 8 if kind == FIXED64 else 4
            if position > len(data):
                raise InvalidModelError(f"field {number} is cut short")
        else:
            raise InvalidModelError(f"field {number} has wire type {kind}, which ONNX never uses")


def messages(data: memoryview, number: int) -> Iterator[memoryview]:
    """The embedded messages (or bytes) of field ``number``."""
    for found, value in fields(data):
        if found == number:
            if not isinstance(value, memoryview):
                raise InvalidModelError(f"field {number} is a number where a message belongs")
            yield value


def text(data: memoryview, number: int) -> str | None:
    """The last string of field ``number``, as protobuf reads a repeated scalar."""
    found = None
    for value in messages(data, number):
        try:
            found = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidModelError(f"field {number} is not UTF-8 text") from exc
    return found


def integer(data: memoryview, number: int) -> int | None:
    """The last value of varint field ``number``, as protobuf reads an int32 or enum:
    only its low 32 bits count."""
    found = None
    for value_number, value in fields(data):
        if value_number == number:
            if not isinstance(value, int):
                raise InvalidModelError(f"field {number} is bytes where a number belongs")
            found = value & 0xFFFFFFFF
    return found
