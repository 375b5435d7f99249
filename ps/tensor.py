"""numpy <-> wire codec: a dtype enum, a shape and raw little-endian bytes; never pickle.

Decoding is ``numpy.frombuffer`` over the received bytes (no copy), so decoded arrays
are read-only views; callers that need to write copy explicitly.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from ps.v1 import tensor_pb2

DType = tensor_pb2.DType

_TO_NUMPY: dict[int, np.dtype] = {
    DType.FLOAT32: np.dtype("<f4"),
    DType.FLOAT64: np.dtype("<f8"),
    DType.FLOAT16: np.dtype("<f2"),
    DType.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    DType.INT32: np.dtype("<i4"),
    DType.INT64: np.dtype("<i8"),
    DType.UINT8: np.dtype("u1"),
}
_FROM_NUMPY: dict[np.dtype, int] = {dt: code for code, dt in _TO_NUMPY.items()}
_NAMES = {code: name.lower() for name, code in DType.items()}

#: dtypes that parameters (and so optimizer updates) may have
FLOAT_DTYPES = (DType.FLOAT32, DType.FLOAT64, DType.FLOAT16, DType.BFLOAT16)


class CodecError(ValueError):
    """A tensor on the wire does not describe a valid array."""


def dtype_name(code: int) -> str:
    return _NAMES.get(code, f"dtype#{code}")


def numpy_dtype(code: int) -> np.dtype:
    try:
        return _TO_NUMPY[code]
    except KeyError:
        raise CodecError(f"unsupported dtype {dtype_name(code)}: expected one of "
                         f"{', '.join(_NAMES[c] for c in _TO_NUMPY)}") from None


def dtype_code(dtype: np.dtype | str | type) -> int:
    dt = np.dtype(dtype).newbyteorder("<")
    try:
        return _FROM_NUMPY[dt]
    except KeyError:
        raise CodecError(f"unsupported dtype {dt}: expected one of "
                         f"{', '.join(_NAMES[c] for c in _TO_NUMPY)}") from None


def to_little_endian(a: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian view or copy of ``a`` (a copy only when it must)."""
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a)


def encode(a: np.ndarray, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Fill (or create) a Tensor message from an array."""
    a = to_little_endian(np.asarray(a))
    msg = tensor_pb2.Tensor() if out is None else out
    msg.dtype = dtype_code(a.dtype)
    del msg.shape[:]
    msg.shape.extend(a.shape)
    msg.data = a.tobytes()
    return msg


def decode(msg: tensor_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """A read-only array over the message's bytes; CodecError names ``what`` on a mismatch."""
    dt = numpy_dtype(msg.dtype)
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"{what}: negative dimension in shape {list(shape)}")
    n = math.prod(shape)  # exact: an int64 product wraps around for hostile shapes
    if len(msg.data) != n * dt.itemsize:
        raise CodecError(f"{what}: shape {list(shape)} of {dtype_name(msg.dtype)} needs "
                         f"{n * dt.itemsize} bytes, got {len(msg.data)}")
    return np.frombuffer(msg.data, dtype=dt).reshape(shape)


def decode_1d(msg: tensor_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """Like decode, but the tensor must be 1-D (a chunk of a flattened parameter)."""
    if len(msg.shape) != 1:
        raise CodecError(f"{what}: expected a 1-D chunk, got shape {list(msg.shape)}")
    return decode(msg, what)


def count_nonfinite(a: np.ndarray) -> int:
    """Number of NaN/inf elements of a 1-D float array. Fast path: one dot product, which is
    NaN or inf whenever any element is (an overflow of finite values falls through to the
    exact scan, so the answer is always exact)."""
    if a.size == 0:
        return 0
    if np.isfinite(np.dot(a, a)):
        return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))
