"""The hot path's wire codec: PushRequest and PullResponse written and read without the
intermediate copies that protobuf message objects make.

The bytes are exactly the protobuf encoding of ps.v1.PushRequest / ps.v1.PullResponse
(tests compare both ways with the generated classes), so any gRPC client speaking the
.proto interoperates. What differs is where the tensor bytes go: encoding joins the small
header with a view of the array (one copy, the join); decoding returns a memoryview into
the received message (no copy), which ``numpy.frombuffer`` reads in place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import grpc
import numpy as np

from ps.v1 import server_pb2, server_pb2_grpc

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_DOUBLE = struct.Struct("<d")
SERVICE = "ps.v1.ParameterServer"


class WireError(ValueError):
    """Bytes that are not a valid encoding of the expected message."""


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field_no: int, wire_type: int) -> bytes:
    return _varint((field_no << 3) | wire_type)


def _len_prefix(field_no: int, length: int) -> bytes:
    return _key(field_no, _LEN) + _varint(length)


def _str_field(field_no: int, s: str) -> bytes:
    if not s:
        return b""
    b = s.encode()
    return _len_prefix(field_no, len(b)) + b


def _uint_field(field_no: int, n: int) -> bytes:
    return _key(field_no, _VARINT) + _varint(n) if n else b""


def _tensor_header(dtype: int, shape: tuple[int, ...], nbytes: int) -> bytes:
    packed = b"".join(_varint(d) for d in shape)
    return (_uint_field(1, dtype) + (_len_prefix(2, len(packed)) + packed if shape else b"")
            + _len_prefix(3, nbytes))


def _chunk_prefix(field_no: int, tensor: str, offset: int, dtype: int, n: int, nbytes: int) -> bytes:
    """Everything of a Chunk field up to its data bytes."""
    theader = _tensor_header(dtype, (n,), nbytes)
    chead = _str_field(1, tensor) + _uint_field(2, offset) + _len_prefix(3, len(theader) + nbytes)
    return _len_prefix(field_no, len(chead) + len(theader) + nbytes) + chead + theader


def encode_push(model: str, client_id: str, seq: int, grad_scale: float, tensor: str, offset: int,
                dtype: int, values: np.ndarray) -> bytes:
    """A serialized ps.v1.PushRequest carrying ``values`` (1-D, contiguous, little-endian)."""
    data = memoryview(values).cast("B")
    head = (_str_field(1, model) + _str_field(2, client_id) + _uint_field(3, seq)
            + (_key(4, _I64) + _DOUBLE.pack(grad_scale) if grad_scale else b""))
    return b"".join((head, _chunk_prefix(5, tensor, offset, dtype, values.size, data.nbytes), data))


def encode_pull_response(tensor: str, offset: int, dtype: int, values: np.ndarray, version: int,
                         duplicate: bool = False) -> bytes:
    """A serialized ps.v1.PullResponse carrying ``values``."""
    data = memoryview(values).cast("B")
    return b"".join((_chunk_prefix(1, tensor, offset, dtype, values.size, data.nbytes), data,
                     _uint_field(2, version), _uint_field(3, int(duplicate))))


# -- decoding ------------------------------------------------------------------------------
def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value) where value is an int or a (start, stop) span."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        fno, wt = key >> 3, key & 7
        if wt == _VARINT:
            v, pos = _read_varint(buf, pos, end)
        elif wt == _LEN:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise WireError(f"field {fno}: length {n} runs past the end of the message")
            v, pos = (pos, pos + n), pos + n
        elif wt == _I64:
            if pos + 8 > end:
                raise WireError(f"field {fno}: truncated 64-bit value")
            v, pos = (pos, pos + 8), pos + 8
        elif wt == _I32:
            if pos + 4 > end:
                raise WireError(f"field {fno}: truncated 32-bit value")
            v, pos = (pos, pos + 4), pos + 4
        else:
            raise WireError(f"field {fno}: unsupported wire type {wt}")
        if fno == 0:
            raise WireError("field number 0 is invalid")
        yield fno, wt, v
    if pos != end:
        raise WireError("message ends inside a field")


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


@dataclass
class TensorView:
    """Duck-types ps.v1.Tensor; ``data`` is a memoryview into the received bytes."""

    dtype: int = 0
    shape: list[int] = field(default_factory=list)
    data: memoryview = memoryview(b"")


@dataclass
class ChunkView:
    tensor: str = ""
    offset: int = 0
    values: TensorView = field(default_factory=TensorView)


@dataclass
class PushView:
    """Duck-types ps.v1.PushRequest."""

    model: str = ""
    client_id: str = ""
    seq: int = 0
    grad_scale: float = 0.0
    chunk: ChunkView = field(default_factory=ChunkView)


@dataclass
class PullView:
    """Duck-types ps.v1.PullResponse."""

    chunk: ChunkView = field(default_factory=ChunkView)
    version: int = 0
    duplicate: bool = False


def _str(mv: memoryview, span) -> str:
    try:
        return bytes(mv[span[0]:span[1]]).decode()
    except UnicodeDecodeError:
        raise WireError("a string field is not valid UTF-8") from None


def _tensor(mv: memoryview, s: int, e: int) -> TensorView:
    t = TensorView()
    for fno, wt, v in _fields(mv, s, e):
        if fno == 1 and wt == _VARINT:
            t.dtype = v
        elif fno == 2 and wt == _LEN:  # packed shape
            p = v[0]
            while p < v[1]:
                d, p = _read_varint(mv, p, v[1])
                t.shape.append(_signed(d))
        elif fno == 2 and wt == _VARINT:
            t.shape.append(_signed(v))
        elif fno == 3 and wt == _LEN:
            t.data = mv[v[0]:v[1]]
    return t


def _chunk(mv: memoryview, s: int, e: int) -> ChunkView:
    c = ChunkView()
    for fno, wt, v in _fields(mv, s, e):
        if fno == 1 and wt == _LEN:
            c.tensor = _str(mv, v)
        elif fno == 2 and wt == _VARINT:
            c.offset = _signed(v)
        elif fno == 3 and wt == _LEN:
            c.values = _tensor(mv, *v)
    return c


def decode_push(data: bytes) -> PushView:
    mv = memoryview(data)
    r = PushView()
    for fno, wt, v in _fields(mv, 0, len(mv)):
        if fno == 1 and wt == _LEN:
            r.model = _str(mv, v)
        elif fno == 2 and wt == _LEN:
            r.client_id = _str(mv, v)
        elif fno == 3 and wt == _VARINT:
            r.seq = v
        elif fno == 4 and wt == _I64:
            r.grad_scale = _DOUBLE.unpack_from(mv, v[0])[0]
        elif fno == 5 and wt == _LEN:
            r.chunk = _chunk(mv, *v)
    return r


def decode_pull_response(data: bytes) -> PullView:
    mv = memoryview(data)
    r = PullView()
    for fno, wt, v in _fields(mv, 0, len(mv)):
        if fno == 1 and wt == _LEN:
            r.chunk = _chunk(mv, *v)
        elif fno == 2 and wt == _VARINT:
            r.version = v
        elif fno == 3 and wt == _VARINT:
            r.duplicate = bool(v)
    return r


def _serialize(msg) -> bytes:
    """Pre-encoded bytes pass through; protobuf messages serialize as usual."""
    return msg if isinstance(msg, (bytes, bytearray)) else msg.SerializeToString()


# -- stubs and servicer registration -----------------------------------------------------------
_FAST_REQUESTS = {"Push", "PushPull"}
_FAST_RESPONSES = {"Pull", "PushPull"}


class ShardStub(server_pb2_grpc.ParameterServerStub):
    """The generated stub, with Push, PushPull and Pull on the copy-free codec: requests may be
    bytes from encode_push, responses come back as PullView."""

    def __init__(self, channel: grpc.Channel):
        super().__init__(channel)
        self.Push = channel.stream_unary(f"/{SERVICE}/Push", request_serializer=_serialize,
                                         response_deserializer=server_pb2.PushResponse.FromString)
        self.PushPull = channel.stream_stream(f"/{SERVICE}/PushPull", request_serializer=_serialize,
                                              response_deserializer=decode_pull_response)
        self.Pull = channel.unary_stream(f"/{SERVICE}/Pull", request_serializer=_serialize,
                                         response_deserializer=decode_pull_response)


def add_shard_servicer(servicer, server: grpc.Server) -> None:
    """Register a ParameterServer servicer: Push/PushPull requests arrive as PushView, and
    Pull/PushPull handlers may yield pre-encoded bytes."""
    methods = server_pb2.DESCRIPTOR.services_by_name["ParameterServer"].methods
    handlers = {}
    for m in methods:
        req_cls = getattr(server_pb2, m.input_type.name)
        resp_cls = getattr(server_pb2, m.output_type.name)
        deserialize = decode_push if m.name in _FAST_REQUESTS else req_cls.FromString
        serialize = _serialize if m.name in _FAST_RESPONSES else resp_cls.SerializeToString
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=deserialize,
                                response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
