"""The wire codec: raw little-endian bytes, zero-copy decode, precise errors."""

import ml_dtypes
import numpy as np
import pytest

from ps.tensor import CodecError, decode, decode_1d, encode
from ps.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", ml_dtypes.bfloat16, "int32", "int64", "uint8"])
def test_every_dtype_round_trips(dtype):
    a = (np.arange(24) - 5).astype(dtype).reshape(2, 3, 4) if dtype != "uint8" else np.arange(24, dtype="u1")
    b = decode(encode(a))
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    assert np.array_equal(b.astype("f8"), a.astype("f8"))


def test_big_endian_input_travels_as_little_endian():
    a = np.arange(5, dtype=">f4")
    msg = encode(a)
    assert msg.data == np.arange(5, dtype="<f4").tobytes()
    assert np.array_equal(decode(msg), a)


def test_decode_is_zero_copy_and_read_only():
    msg = encode(np.ones(1000, np.float32))
    a = decode(msg)
    assert not a.flags.owndata and not a.flags.writeable


def test_wrong_byte_length_is_named():
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[4], data=b"\0" * 15)
    with pytest.raises(CodecError, match=r"grad 'w': shape \[4\] of float32 needs 16 bytes, got 15"):
        decode(msg, "grad 'w'")


def test_unknown_dtype_and_non_1d_chunks_are_rejected():
    with pytest.raises(CodecError, match="unsupported dtype dtype#42"):
        decode(tensor_pb2.Tensor(dtype=42, shape=[1], data=b"\0"))
    with pytest.raises(CodecError, match=r"expected a 1-D chunk, got shape \[2, 2\]"):
        decode_1d(encode(np.zeros((2, 2), np.float32)))
    with pytest.raises(CodecError, match="unsupported dtype complex64"):
        encode(np.zeros(2, np.complex64))


def test_a_shape_whose_int64_product_wraps_around_is_refused():
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2**32, 2**32], data=b"")  # 2^64 wraps to 0
    with pytest.raises(CodecError, match=r"needs 73786976294838206464 bytes, got 0"):
        decode(msg, "t")
