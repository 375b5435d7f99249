"""ps.wire, the hand-written codec of the hot path, against the generated protobuf classes:
what it writes parses with them (byte for byte what they write), what they write it reads,
its field numbers are the .proto's, and bytes that are not a message raise WireError."""

from __future__ import annotations

import math
import struct

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ps import rpc, wire
from ps.tensor import numpy_dtype
from ps.v1 import server_pb2, tensor_pb2

CHECKS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MESSAGES = {"PushRequest": server_pb2.PushRequest, "PullResponse": server_pb2.PullResponse,
            "Chunk": tensor_pb2.Chunk, "Tensor": tensor_pb2.Tensor,
            "PushBatchRequest": server_pb2.PushBatchRequest, "PushBatchResponse": server_pb2.PushBatchResponse}
DTYPES = [c for c in tensor_pb2.DType.values() if c != tensor_pb2.DTYPE_UNSPECIFIED]  # every one the codec carries

uint64s = st.integers(0, 2**64 - 1)
int64s = st.integers(-2**63, 2**63 - 1)
int32s = st.integers(-2**31, 2**31 - 1)
texts = st.one_of(st.just(""), st.text(), st.text("é€𝄞\u200b\ufeff\x00", max_size=8))  # incl. 2-4 byte UTF-8
doubles = st.one_of(st.floats(),  # any double: NaN, +-inf, subnormals, +-0.0
                    st.sampled_from([0.0, -0.0, 1.0, -1.0, math.nan, -math.nan, math.inf, -math.inf,
                                     5e-324, -5e-324, 2.2250738585072009e-308, 1.7976931348623157e308]))
dtype_codes = st.one_of(st.sampled_from([0, *DTYPES]), int32s)


@st.composite
def arrays(draw):
    """A 1-D little-endian array of any carried dtype and any bit patterns (NaNs included), empty too."""
    dt = numpy_dtype(draw(st.sampled_from(DTYPES)))
    raw = draw(st.binary(max_size=400))
    return np.frombuffer(raw[:len(raw) // dt.itemsize * dt.itemsize], dt)


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def fields(msg) -> tuple:
    """Every field of a PushRequest / PullResponse, from a generated message or a wire view alike;
    doubles by their bits (so NaN == NaN and -0.0 != 0.0)."""
    c = msg.chunk
    head = ((msg.model, msg.client_id, msg.seq, bits(msg.grad_scale)) if hasattr(msg, "seq")
            else (msg.version, msg.duplicate))
    return (*head, c.tensor, c.offset, c.values.dtype, list(c.values.shape), bytes(c.values.data))


def pb_push(model, client_id, seq, scale, tensor, offset, dtype, values):
    return server_pb2.PushRequest(model=model, client_id=client_id, seq=seq, grad_scale=scale, chunk=tensor_pb2.Chunk(
        tensor=tensor, offset=offset, values=tensor_pb2.Tensor(dtype=dtype, shape=[values.size], data=values.tobytes())))


def pb_pull(tensor, offset, dtype, values, version, duplicate):
    return server_pb2.PullResponse(version=version, duplicate=duplicate, chunk=tensor_pb2.Chunk(
        tensor=tensor, offset=offset, values=tensor_pb2.Tensor(dtype=dtype, shape=[values.size], data=values.tobytes())))


push_args = st.tuples(texts, texts, uint64s, doubles, texts, int64s, dtype_codes, arrays())
pull_args = st.tuples(texts, int64s, dtype_codes, arrays(), uint64s, st.booleans())


# -- what the codec writes: the generated classes parse it, and write the same bytes ------------
@CHECKS
@given(push_args)
@example(("", "", 0, 0.0, "", 0, 0, np.zeros(0, np.float32)))  # every field at its default
@example(("m", "c", 2**64 - 1, -0.0, "w", -2**63, -1, np.array([np.nan, -0.0], np.float32)))
def test_encode_push_is_the_protobuf_encoding(args):
    data = wire.encode_push(*args)
    parsed = server_pb2.PushRequest.FromString(data)
    assert fields(parsed) == fields(pb_push(*args))
    model, client_id, seq, scale, tensor, offset, dtype, values = args
    assert (parsed.model, parsed.client_id, parsed.seq, bits(parsed.grad_scale)) == (model, client_id, seq, bits(scale))
    assert (parsed.chunk.tensor, parsed.chunk.offset, parsed.chunk.values.dtype) == (tensor, offset, dtype)
    assert list(parsed.chunk.values.shape) == [values.size] and parsed.chunk.values.data == values.tobytes()
    assert data == pb_push(*args).SerializeToString(deterministic=True)
    assert fields(wire.decode_push(data)) == fields(parsed)


@CHECKS
@given(pull_args)
@example(("", 0, 0, np.zeros(0, np.uint8), 0, False))
@example(("w", -1, 2**31 - 1, np.arange(3, dtype=np.int64), 2**64 - 1, True))
def test_encode_pull_response_is_the_protobuf_encoding(args):
    data = wire.encode_pull_response(*args)
    parsed = server_pb2.PullResponse.FromString(data)
    tensor, offset, dtype, values, version, duplicate = args
    assert (parsed.version, parsed.duplicate, parsed.chunk.tensor, parsed.chunk.offset) == (version, duplicate, tensor, offset)
    assert parsed.chunk.values.dtype == dtype and list(parsed.chunk.values.shape) == [values.size]
    assert parsed.chunk.values.data == values.tobytes()
    assert data == pb_pull(*args).SerializeToString(deterministic=True)
    assert fields(wire.decode_pull_response(data)) == fields(parsed)


@CHECKS
@given(st.lists(push_args, max_size=3), st.lists(pull_args, max_size=3), st.booleans(), uint64s, uint64s)
def test_encode_push_batch_and_its_response_are_the_protobuf_encodings(pushes, pulls, pull, applied, duplicates):
    data = wire.encode_push_batch([wire.encode_push(*a) for a in pushes], pull)
    expected = server_pb2.PushBatchRequest(chunks=[pb_push(*a) for a in pushes], pull=pull)
    assert data == expected.SerializeToString(deterministic=True)
    applied, duplicates = applied >> 1, duplicates >> 1  # int64 fields
    data = wire.encode_push_batch_response([wire.encode_pull_response(*a) for a in pulls], applied, duplicates)
    expected = server_pb2.PushBatchResponse(chunks=[pb_pull(*a) for a in pulls], applied=applied, duplicates=duplicates)
    assert data == expected.SerializeToString(deterministic=True)


def test_a_default_size_chunk_encodes_as_protobuf_does():
    """2 MiB: length prefixes of 3 bytes, which the small examples above do not reach."""
    values = np.random.default_rng(0).standard_normal(rpc.DEFAULT_CHUNK_BYTES // 4).astype(np.float32)
    args = ("model", "client", 7, 0.25, "w", 1 << 40, tensor_pb2.FLOAT32, values)
    assert wire.encode_push(*args) == pb_push(*args).SerializeToString()
    pull = ("w", 1 << 40, tensor_pb2.FLOAT32, values, 9, True)
    assert wire.encode_pull_response(*pull) == pb_pull(*pull).SerializeToString()
    view = wire.decode_push(wire.encode_push(*args))
    np.testing.assert_array_equal(np.frombuffer(view.chunk.values.data, np.float32), values)


# -- what the generated classes write: the codec reads the same fields ---------------------------
@st.composite
def pb_tensors(draw):
    """Any Tensor, including what the codec never writes: other shapes, bytes that fit no shape."""
    return tensor_pb2.Tensor(dtype=draw(dtype_codes), shape=draw(st.lists(int64s, max_size=4)),
                             data=draw(st.binary(max_size=300)))


@st.composite
def pb_chunks(draw):
    values = draw(st.none() | pb_tensors())
    chunk = tensor_pb2.Chunk(tensor=draw(texts), offset=draw(int64s))
    if values is not None:
        chunk.values.CopyFrom(values)
    return chunk


@st.composite
def pb_pushes(draw):
    msg = server_pb2.PushRequest(model=draw(texts), client_id=draw(texts), seq=draw(uint64s),
                                 grad_scale=draw(doubles))
    chunk = draw(st.none() | pb_chunks())
    if chunk is not None:
        msg.chunk.CopyFrom(chunk)
    return msg


@st.composite
def pb_pulls(draw):
    msg = server_pb2.PullResponse(version=draw(uint64s), duplicate=draw(st.booleans()))
    chunk = draw(st.none() | pb_chunks())
    if chunk is not None:
        msg.chunk.CopyFrom(chunk)
    return msg


@CHECKS
@given(pb_pushes())
def test_decode_push_reads_what_protobuf_writes(msg):
    view = wire.decode_push(msg.SerializeToString())
    assert fields(view) == fields(msg)
    assert isinstance(view.chunk.values.data, memoryview)  # in place, not copied


@CHECKS
@given(pb_pulls())
def test_decode_pull_response_reads_what_protobuf_writes(msg):
    view = wire.decode_pull_response(msg.SerializeToString())
    assert fields(view) == fields(msg)
    assert isinstance(view.chunk.values.data, memoryview)


def test_unpacked_shapes_unknown_fields_and_the_last_scalar_read_as_protobuf_reads_them():
    """Encodings protobuf's parsers accept though its serializers do not write them."""
    tensor = b"\x08\x01" + b"\x10\x03\x10\x04" + b"\x1a\x02ab"  # dtype, shape 3 and 4 unpacked, data
    chunk = b"\x0a\x01w" + b"\x10\x05" + b"\x10\x06" + b"\x1a" + bytes([len(tensor)]) + tensor  # offset twice
    data = b"\x0a" + bytes([len(chunk)]) + chunk + b"\x10\x07" + b"\xf8\x01\x2a" + b"\x1a\x00"  # unknown field 31
    parsed = server_pb2.PullResponse.FromString(data)
    assert list(parsed.chunk.values.shape) == [3, 4] and parsed.chunk.offset == 6
    assert fields(wire.decode_pull_response(data)) == fields(parsed)


def test_varints_read_as_protobuf_reads_them():
    """Ten-byte varints keep their low 64 bits; an enum keeps its low 32 bits, signed."""
    tensor = b"\x08" + b"\xfe" + b"\xff" * 8 + b"\x7f"  # dtype: 2**70 - 2
    chunk = b"\x1a" + bytes([len(tensor)]) + tensor
    data = b"\x18" + b"\xff" * 9 + b"\x7f" + b"\x2a" + bytes([len(chunk)]) + chunk  # seq: 2**70 - 1
    parsed = server_pb2.PushRequest.FromString(data)
    view = wire.decode_push(data)
    assert (view.seq, view.chunk.values.dtype) == (parsed.seq, parsed.chunk.values.dtype) == (2**64 - 1, -2)


# -- the codec's field numbers are the .proto's ------------------------------------------------
WIRE_TYPE = {FD.TYPE_STRING: wire._LEN, FD.TYPE_BYTES: wire._LEN, FD.TYPE_MESSAGE: wire._LEN,
             FD.TYPE_UINT64: wire._VARINT, FD.TYPE_INT64: wire._VARINT, FD.TYPE_BOOL: wire._VARINT,
             FD.TYPE_ENUM: wire._VARINT, FD.TYPE_DOUBLE: wire._I64}
TYPE_NAME = {v: k for k, v in vars(FD).items() if k.startswith("TYPE_")}


@pytest.mark.parametrize("message,name", sorted(wire.FIELDS), ids="{0[0]}.{0[1]}".format)
def test_the_codecs_field_numbers_and_wire_types_are_the_protos(message, name):
    field = MESSAGES[message].DESCRIPTOR.fields_by_name.get(name)
    assert field is not None, f"ps.v1.{message} has no field '{name}' any more: update ps/wire.py"
    number, wire_type = wire.FIELDS[message, name]
    assert field.number == number, (f"ps.v1.{message}.{name} is field {field.number} in the .proto, "
                                    f"{number} in ps/wire.py")
    assert field.type in WIRE_TYPE, f"ps.v1.{message}.{name} is now {TYPE_NAME[field.type]}: update ps/wire.py"
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == FD.LABEL_REPEATED
    expected = wire._LEN if repeated else WIRE_TYPE[field.type]  # repeated scalars: packed in proto3
    assert wire_type == expected, (f"ps.v1.{message}.{name} ({TYPE_NAME[field.type]}) travels as wire type "
                                   f"{expected}, ps/wire.py has {wire_type}")


@pytest.mark.parametrize("message", sorted(MESSAGES))
def test_the_codec_knows_every_field_of_its_messages(message):
    """A field added to the .proto would be dropped silently by the codec: it must learn it first."""
    unknown = set(MESSAGES[message].DESCRIPTOR.fields_by_name) - {f for m, f in wire.FIELDS if m == message}
    assert not unknown, f"ps.v1.{message} has fields ps/wire.py does not encode or decode: {sorted(unknown)}"


# -- bytes that are not a message ---------------------------------------------------------------
def _decodes_or_wire_error(decode, data: bytes):
    try:
        view = decode(data)
    except wire.WireError as e:
        assert str(e)  # names the problem
        return None
    c = view.chunk  # whatever it accepts is in the fields' ranges, typed as the generated classes type them
    assert 0 <= (view.seq if hasattr(view, "seq") else view.version) < 2**64
    assert -2**63 <= c.offset < 2**63 and -2**31 <= c.values.dtype < 2**31
    assert all(-2**63 <= d < 2**63 for d in c.values.shape)
    assert isinstance(c.tensor, str) and isinstance(c.values.data, memoryview)
    return view


@CHECKS
@given(st.binary(max_size=300))
@example(b"\xff" * 11)  # an overlong varint
@example(b"\x0b")  # a group start: wire type 3
@example(b"\x00")  # field number 0
@example(b"\x2a\xff\xff\xff\xff\xff\xff\xff\xff\x7f")  # a length of 2**63
@example(b"\x0a\x02\xc3\x28")  # a string that is not UTF-8
@example(b"\x2a\x04\x1a\x02\x12\x80")  # a packed shape ending inside a varint
def test_random_bytes_decode_or_raise_wire_error(data):
    _decodes_or_wire_error(wire.decode_push, data)
    _decodes_or_wire_error(wire.decode_pull_response, data)


@CHECKS
@given(push_args, pull_args, st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupted_messages_decode_or_raise_wire_error(push, pull, flips):
    """Valid messages with bytes overwritten: garbage that gets past the first few bytes."""
    for encoded, decode in ((wire.encode_push(*push), wire.decode_push),
                            (wire.encode_pull_response(*pull), wire.decode_pull_response)):
        data = bytearray(encoded)
        for pos, byte in flips:
            data[pos % len(data)] = byte
        _decodes_or_wire_error(decode, bytes(data))


def _field_ends(data: bytes) -> set[int]:
    """Where each top-level field of a valid message ends (and 0)."""
    ends, pos = {0}, 0
    while pos < len(data):
        key, pos = wire._read_varint(data, pos, len(data))
        if key & 7 == wire._VARINT:
            pos = wire._read_varint(data, pos, len(data))[1]
        elif key & 7 == wire._LEN:
            n, pos = wire._read_varint(data, pos, len(data))
            pos += n
        else:
            pos += 8 if key & 7 == wire._I64 else 4
        ends.add(pos)
    return ends


@CHECKS
@given(push_args, pull_args)
def test_truncated_messages_raise_wire_error(push, pull):
    """Cut inside a field, a message is WireError (protobuf's parser too raises DecodeError); cut
    between two top-level fields, it is a shorter valid message, read as protobuf reads it."""
    for encoded, decode, cls in ((wire.encode_push(*push), wire.decode_push, server_pb2.PushRequest),
                                 (wire.encode_pull_response(*pull), wire.decode_pull_response, server_pb2.PullResponse)):
        ends = _field_ends(encoded)
        for cut in range(len(encoded)):
            data = encoded[:cut]
            if cut in ends:
                assert fields(decode(data)) == fields(cls.FromString(data))
            else:
                with pytest.raises(wire.WireError):
                    decode(data)
                with pytest.raises(DecodeError):
                    cls.FromString(data)


def _server_with_real_servicer():
    from ps.server.service import ParameterServerServicer
    from ps.server.shard import ShardStore
    server = rpc.make_server(2)
    wire.add_shard_servicer(ParameterServerServicer(ShardStore()), server)
    port = rpc.bind(server, "127.0.0.1", 0)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("method", ["Push", "PushPull"])
def test_a_malformed_push_is_invalid_argument_naming_the_problem(method):
    server, address = _server_with_real_servicer()
    try:
        with grpc.insecure_channel(address) as ch:
            kind = ch.stream_unary if method == "Push" else ch.stream_stream
            call = kind(f"/ps.v1.ParameterServer/{method}")  # no serializer: the raw bytes go out
            truncated = wire.encode_push("m", "c", 1, 0.0, "w", 0, tensor_pb2.FLOAT32, np.ones(4, np.float32))[:-3]
            with pytest.raises(grpc.RpcError) as err:
                result = call(iter([truncated]), timeout=10)
                if method == "PushPull":
                    list(result)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("malformed push request: ps.v1.PushRequest field 5: length")
    finally:
        server.stop(0)


@pytest.mark.parametrize("method,kind", [("CreateModel", "unary_unary"), ("Pull", "unary_stream"),
                                         ("DeleteModel", "unary_unary"), ("Stats", "unary_unary")])
def test_a_malformed_request_to_any_shard_method_is_invalid_argument(method, kind):
    server, address = _server_with_real_servicer()
    try:
        with grpc.insecure_channel(address) as ch:
            call = getattr(ch, kind)(f"/ps.v1.ParameterServer/{method}")
            with pytest.raises(grpc.RpcError) as err:
                result = call(b"\x0a\xff\xff\xff\x0f", timeout=10)  # a string field longer than the message
                if kind == "unary_stream":
                    list(result)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(f"malformed {method}Request: Error parsing message")
    finally:
        server.stop(0)


# -- the benchmark --------------------------------------------------------------------------------
def test_bench_codec_reports_every_step():
    from ps.bench import CODEC_STEPS, codec
    result = codec(chunk_bytes=4096, iterations=3, echo=lambda _: None)
    keys = {"chunk_bytes", "iterations", "protobuf", "total_wire_us", "total_generated_us", "speedup"}
    keys |= {f"{s}_{k}" for s in CODEC_STEPS for k in ("wire_us", "generated_us", "speedup")}
    assert set(result) == keys
    assert result["chunk_bytes"] == 4096 and result["iterations"] == 3
    assert all(result[k] > 0 for k in keys - {"protobuf"})


def test_bench_codec_command_prints_one_json_object_last():
    import json

    from click.testing import CliRunner

    from ps.cli import main
    out = CliRunner().invoke(main, ["bench", "codec", "--chunk", "4KiB", "--iterations", "2", "--json"])
    assert out.exit_code == 0, out.output
    last = json.loads(out.output.strip().splitlines()[-1])
    assert last["chunk_bytes"] == 4096 and "speedup" in last
