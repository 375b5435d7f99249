"""The hot path's wire codec: PushRequest and PullResponse written and read without the
intermediate copies that protobuf message objects make.

The bytes are exactly the protobuf encoding of ps.v1.PushRequest / ps.v1.PullResponse
(tests compare both ways with the generated classes), so any gRPC client speaking the
.proto interoperates. What differs is where the tensor bytes go: encoding joins the small
header with a view of the array (one copy, the join); decoding returns a memoryview into
the received message (no copy), which ``numpy.frombuffer`` reads in place.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

import grpc
import numpy as np

from ps import rpc
from ps.v1 import server_pb2, server_pb2_grpc

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_DOUBLE = struct.Struct("<d")
_ZERO_DOUBLE = bytes(8)
_U64 = (1 << 64) - 1
SERVICE = "ps.v1.ParameterServer"

# Field numbers, typed by hand from proto/ps/v1/server.proto and tensor.proto.
_PUSH_MODEL, _PUSH_CLIENT_ID, _PUSH_SEQ, _PUSH_GRAD_SCALE, _PUSH_CHUNK = 1, 2, 3, 4, 5
_PULL_CHUNK, _PULL_VERSION, _PULL_DUPLICATE = 1, 2, 3
_CHUNK_TENSOR, _CHUNK_OFFSET, _CHUNK_VALUES = 1, 2, 3
_BATCH_CHUNKS, _BATCH_PULL = 1, 2  # PushBatchRequest
_BATCHED_CHUNKS, _BATCHED_APPLIED, _BATCHED_DUPLICATES = 1, 2, 3  # PushBatchResponse
_TENSOR_DTYPE, _TENSOR_SHAPE, _TENSOR_DATA = 1, 2, 3

#: (message, field) -> (field number, wire type) of every field the codec writes and reads, for
#: tests/test_wire.py to check against the generated descriptors (shape: packed, so length-delimited)
FIELDS = {
    ("PushRequest", "model"): (_PUSH_MODEL, _LEN), ("PushRequest", "client_id"): (_PUSH_CLIENT_ID, _LEN),
    ("PushRequest", "seq"): (_PUSH_SEQ, _VARINT), ("PushRequest", "grad_scale"): (_PUSH_GRAD_SCALE, _I64),
    ("PushRequest", "chunk"): (_PUSH_CHUNK, _LEN),
    ("PullResponse", "chunk"): (_PULL_CHUNK, _LEN), ("PullResponse", "version"): (_PULL_VERSION, _VARINT),
    ("PullResponse", "duplicate"): (_PULL_DUPLICATE, _VARINT),
    ("Chunk", "tensor"): (_CHUNK_TENSOR, _LEN), ("Chunk", "offset"): (_CHUNK_OFFSET, _VARINT),
    ("Chunk", "values"): (_CHUNK_VALUES, _LEN),
    ("Tensor", "dtype"): (_TENSOR_DTYPE, _VARINT), ("Tensor", "shape"): (_TENSOR_SHAPE, _LEN),
    ("Tensor", "data"): (_TENSOR_DATA, _LEN),
    ("PushBatchRequest", "chunks"): (_BATCH_CHUNKS, _LEN), ("PushBatchRequest", "pull"): (_BATCH_PULL, _VARINT),
    ("PushBatchResponse", "chunks"): (_BATCHED_CHUNKS, _LEN),
    ("PushBatchResponse", "applied"): (_BATCHED_APPLIED, _VARINT),
    ("PushBatchResponse", "duplicates"): (_BATCHED_DUPLICATES, _VARINT),
}


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
    return (_uint_field(_TENSOR_DTYPE, dtype)
            + (_len_prefix(_TENSOR_SHAPE, len(packed)) + packed if shape else b"")
            + (_len_prefix(_TENSOR_DATA, nbytes) if nbytes else b""))  # proto3 leaves empty bytes out


def _raw(values: np.ndarray) -> memoryview:
    """The bytes of a 1-D contiguous array, uncopied (through a uint8 view: a memoryview of
    ml_dtypes' bfloat16 cannot be taken directly)."""
    return memoryview(values.view(np.uint8))


@functools.lru_cache(maxsize=4096)  # a model's chunks recur every step: built once, not per message
def _chunk_prefix(field_no: int, tensor: str, offset: int, dtype: int, n: int, nbytes: int) -> bytes:
    """Everything of a Chunk field up to its data bytes."""
    theader = _tensor_header(dtype, (n,), nbytes)
    chead = (_str_field(_CHUNK_TENSOR, tensor) + _uint_field(_CHUNK_OFFSET, offset)
             + _len_prefix(_CHUNK_VALUES, len(theader) + nbytes))
    return _len_prefix(field_no, len(chead) + len(theader) + nbytes) + chead + theader


def encode_push(model: str, client_id: str, seq: int, grad_scale: float, tensor: str, offset: int,
                dtype: int, values: np.ndarray) -> bytes:
    """A serialized ps.v1.PushRequest carrying ``values`` (1-D, contiguous, little-endian)."""
    data = _raw(values)
    scale = _DOUBLE.pack(grad_scale)  # written unless +0.0, as protobuf does (-0.0 and NaN are)
    return b"".join((_push_ids(model, client_id), _uint_field(_PUSH_SEQ, seq),
                     _SCALE_KEY + scale if scale != _ZERO_DOUBLE else b"",
                     _chunk_prefix(_PUSH_CHUNK, tensor, offset, dtype, values.size, data.nbytes), data))


@functools.lru_cache(maxsize=1024)
def _push_ids(model: str, client_id: str) -> bytes:
    return _str_field(_PUSH_MODEL, model) + _str_field(_PUSH_CLIENT_ID, client_id)


_SCALE_KEY = _key(_PUSH_GRAD_SCALE, _I64)


#: ps.v1.ReplicaOp.push, ps.v1.ReplicateRequest fields
_OP_PUSH = 2
_REPL_MODEL, _REPL_OPTIMIZER, _REPL_PRIMARY, _REPL_OPS = 1, 2, 3, 4


def _embedded(field_no: int, messages) -> list[bytes]:
    """A repeated message field of already serialized messages: each one's length prefix, then it."""
    parts = []
    for m in messages:
        parts += (_len_prefix(field_no, len(m)), m)
    return parts


def replica_push_op(push: bytes) -> bytes:
    """A serialized ps.v1.ReplicaOp carrying a serialized PushRequest (as encode_push makes)."""
    return _len_prefix(_OP_PUSH, len(push)) + push


def encode_replicate(model: str, optimizer: bytes, primary: str, ops) -> bytes:
    """A serialized ps.v1.ReplicateRequest from already serialized parts (no copy of the ops but the join)."""
    return b"".join([_str_field(_REPL_MODEL, model), _len_prefix(_REPL_OPTIMIZER, len(optimizer)), optimizer,
                     _str_field(_REPL_PRIMARY, primary), *_embedded(_REPL_OPS, ops)])


def encode_pull_response(tensor: str, offset: int, dtype: int, values: np.ndarray, version: int,
                         duplicate: bool = False) -> bytes:
    """A serialized ps.v1.PullResponse carrying ``values``."""
    data = _raw(values)
    return b"".join((_chunk_prefix(_PULL_CHUNK, tensor, offset, dtype, values.size, data.nbytes), data,
                     _uint_field(_PULL_VERSION, version), _uint_field(_PULL_DUPLICATE, int(duplicate))))


def encode_push_batch(pushes: list[bytes], pull: bool) -> bytes:
    """A serialized ps.v1.PushBatchRequest of PushRequests as ``encode_push`` makes them."""
    return b"".join([*_embedded(_BATCH_CHUNKS, pushes), _uint_field(_BATCH_PULL, int(pull))])


def encode_push_batch_response(pulls: list[bytes], applied: int, duplicates: int) -> bytes:
    """A serialized ps.v1.PushBatchResponse of PullResponses as ``encode_pull_response`` makes them."""
    return b"".join([*_embedded(_BATCHED_CHUNKS, pulls), _uint_field(_BATCHED_APPLIED, applied),
                     _uint_field(_BATCHED_DUPLICATES, duplicates)])


# -- decoding ------------------------------------------------------------------------------
def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    """A varint as protobuf reads it: at most 10 bytes, bits past the 64th dropped."""
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        if shift > 63:
            raise WireError("varint longer than 10 bytes")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & _U64, pos
        shift += 7


def _fields(buf, pos: int, end: int, msg: str):
    """(field number, wire type, value) where value is an int or a (start, stop) span; a
    WireError names ``msg`` (the message type) and the field."""
    fno = None
    try:
        while pos < end:
            fno = None
            key, pos = _read_varint(buf, pos, end)
            fno, wt = key >> 3, key & 7
            if fno == 0:
                raise WireError("field number 0 is invalid")
            if wt == _VARINT:
                v, pos = _read_varint(buf, pos, end)
            elif wt == _LEN:
                n, pos = _read_varint(buf, pos, end)
                if n > end - pos:
                    raise WireError(f"length {n} runs past the end of the message ({end - pos} bytes left)")
                v, pos = (pos, pos + n), pos + n
            elif wt == _I64:
                if pos + 8 > end:
                    raise WireError("truncated 64-bit value")
                v, pos = (pos, pos + 8), pos + 8
            elif wt == _I32:
                if pos + 4 > end:
                    raise WireError("truncated 32-bit value")
                v, pos = (pos, pos + 4), pos + 4
            else:
                raise WireError(f"unsupported wire type {wt}")
            yield fno, wt, v
    except WireError as e:
        raise WireError(f"{msg} {'field key' if fno is None else f'field {fno}'}: {e}") from None


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _enum(n: int) -> int:
    """An enum varint as protobuf reads it: the low 32 bits, signed."""
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n >= 1 << 31 else n


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


def _str(mv: memoryview, span, what: str) -> str:
    try:
        return bytes(mv[span[0]:span[1]]).decode()
    except UnicodeDecodeError:
        raise WireError(f"{what} is not valid UTF-8") from None


def _tensor(mv: memoryview, s: int, e: int) -> TensorView:
    t = TensorView()
    for fno, wt, v in _fields(mv, s, e, "ps.v1.Tensor"):
        if fno == _TENSOR_DTYPE and wt == _VARINT:
            t.dtype = _enum(v)
        elif fno == _TENSOR_SHAPE and wt == _LEN:  # packed shape
            p = v[0]
            try:
                while p < v[1]:
                    d, p = _read_varint(mv, p, v[1])
                    t.shape.append(_signed(d))
            except WireError as err:
                raise WireError(f"ps.v1.Tensor field {fno} (packed shape): {err}") from None
        elif fno == _TENSOR_SHAPE and wt == _VARINT:
            t.shape.append(_signed(v))
        elif fno == _TENSOR_DATA and wt == _LEN:
            t.data = mv[v[0]:v[1]]
    return t


def _chunk(mv: memoryview, s: int, e: int) -> ChunkView:
    c = ChunkView()
    for fno, wt, v in _fields(mv, s, e, "ps.v1.Chunk"):
        if fno == _CHUNK_TENSOR and wt == _LEN:
            c.tensor = _str(mv, v, "ps.v1.Chunk.tensor")
        elif fno == _CHUNK_OFFSET and wt == _VARINT:
            c.offset = _signed(v)
        elif fno == _CHUNK_VALUES and wt == _LEN:
            c.values = _tensor(mv, *v)
    return c


def decode_push(data: bytes) -> PushView:
    """A serialized ps.v1.PushRequest, read in place; WireError names what is wrong with bytes
    that are not one."""
    mv = memoryview(data)
    r = PushView()
    for fno, wt, v in _fields(mv, 0, len(mv), "ps.v1.PushRequest"):
        if fno == _PUSH_MODEL and wt == _LEN:
            r.model = _str(mv, v, "ps.v1.PushRequest.model")
        elif fno == _PUSH_CLIENT_ID and wt == _LEN:
            r.client_id = _str(mv, v, "ps.v1.PushRequest.client_id")
        elif fno == _PUSH_SEQ and wt == _VARINT:
            r.seq = v
        elif fno == _PUSH_GRAD_SCALE and wt == _I64:
            r.grad_scale = _DOUBLE.unpack_from(mv, v[0])[0]
        elif fno == _PUSH_CHUNK and wt == _LEN:
            r.chunk = _chunk(mv, *v)
    return r


def decode_pull_response(data: bytes) -> PullView:
    """A serialized ps.v1.PullResponse, read in place (WireError as decode_push)."""
    mv = memoryview(data)
    r = PullView()
    for fno, wt, v in _fields(mv, 0, len(mv), "ps.v1.PullResponse"):
        if fno == _PULL_CHUNK and wt == _LEN:
            r.chunk = _chunk(mv, *v)
        elif fno == _PULL_VERSION and wt == _VARINT:
            r.version = v
        elif fno == _PULL_DUPLICATE and wt == _VARINT:
            r.duplicate = bool(v)
    return r


def _serialize(msg) -> bytes:
    """Pre-encoded bytes pass through; protobuf messages serialize as usual."""
    return msg if isinstance(msg, (bytes, bytearray)) else msg.SerializeToString()


# -- stubs and servicer registration -----------------------------------------------------------
_FAST_REQUESTS = {"Push", "PushPull", "PushAcked"}
_FAST_RESPONSES = {"Pull", "PushPull", "PushBatch"}


class ShardStub(server_pb2_grpc.ParameterServerStub):
    """The generated stub, with Push, PushPull, PushBatch and Pull taking pre-encoded requests
    (encode_push, encode_push_batch); Pull and PushPull responses come back as PullView (read in place)."""

    def __init__(self, channel: grpc.Channel):
        super().__init__(channel)

        def method(kind: str, name: str, deserializer):  # registered, as the generated stubs' are
            return getattr(channel, kind)(f"/{SERVICE}/{name}", request_serializer=_serialize,
                                          response_deserializer=deserializer, _registered_method=True)
        self.Push = method("stream_unary", "Push", server_pb2.PushResponse.FromString)
        self.PushPull = method("stream_stream", "PushPull", decode_pull_response)
        self.PushAcked = method("stream_stream", "PushAcked", server_pb2.PushAck.FromString)
        self.Pull = method("unary_stream", "Pull", decode_pull_response)
        # small by design (up to Client.batch_bytes): protobuf's C parser beats reading it in place
        self.PushBatch = method("unary_unary", "PushBatch", server_pb2.PushBatchResponse.FromString)


def add_shard_servicer(servicer, server: grpc.Server) -> None:
    """Register a ParameterServer servicer: Push/PushPull requests arrive as PushView, and
    Pull/PushPull handlers may yield pre-encoded bytes. Bytes that are not a request end the
    call with INVALID_ARGUMENT naming the problem (``rpc.add_servicer``)."""
    push = rpc.tolerant_deserializer(decode_push, "push request", WireError)
    rpc.add_servicer(servicer, server, server_pb2.DESCRIPTOR.services_by_name["ParameterServer"],
                     deserializers=dict.fromkeys(_FAST_REQUESTS, push),
                     serializers=dict.fromkeys(_FAST_RESPONSES, _serialize))
