"""Seeded parameter initializers whose values do not depend on how a tensor is sharded.

Element i of a tensor is drawn from a Philox stream keyed by (seed, tensor name) at the
block that holds i, so any shard computes its slice alone and the whole tensor comes out
identical for any number of shards.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ps.errors import InvalidArgument

KINDS = ("zeros", "constant", "normal", "uniform", "glorot_uniform", "he_normal")
BLOCK = 1 << 16


@dataclass(frozen=True)
class Init:
    """An initializer spec, e.g. ``Init("glorot_uniform", (784, 256), seed=1)``."""

    kind: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    seed: int = 0
    value: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    low: float = -0.05
    high: float = 0.05
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidArgument(f"unknown initializer '{self.kind}': expected one of {', '.join(KINDS)}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not 0 <= int(self.seed) < 1 << 64:
            raise InvalidArgument(f"initializer '{self.kind}': seed must be in [0, 2**64), got {self.seed}")
        # Values a draw cannot overflow in the parameters' dtype (uniform draws high - low; a
        # normal draw never strays 16 standard deviations), and no NaN or inf.
        try:
            top = float(np.finfo(np.dtype(self.dtype)).max) / 16
        except (TypeError, ValueError):
            top = float(np.finfo(np.float64).max) / 16
        for name in ("value", "mean", "std", "low", "high"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.number)) or isinstance(v, bool) or not math.isfinite(v) \
                    or abs(v) > top:
                raise InvalidArgument(f"initializer '{self.kind}': {name} must be a finite number of magnitude "
                                      f"at most {top:.3g} ({self.dtype}), got {v!r}")
        if self.std < 0:
            raise InvalidArgument(f"initializer '{self.kind}': std must be >= 0, got {self.std}")

    def to_proto(self):
        """The ps.v1.Initializer that asks a shard to compute this initializer for its slices."""
        from ps.v1 import server_pb2
        return server_pb2.Initializer(kind=self.kind, value=self.value, mean=self.mean, std=self.std,
                                      low=self.low, high=self.high, seed=self.seed)

    @classmethod
    def from_proto(cls, msg, shape: tuple[int, ...], dtype: str) -> "Init | None":
        """The Init a ps.v1.Initializer describes for a tensor (None when unset); proto3 zeros
        mean the defaults where zero makes no sense (std 0, an empty uniform range)."""
        if not msg.kind:
            return None
        kw = {}
        if msg.kind == "constant":
            kw["value"] = msg.value
        elif msg.kind == "normal":
            kw.update(mean=msg.mean, std=msg.std or 1.0)
        elif msg.kind == "uniform" and (msg.low or msg.high):
            kw.update(low=msg.low, high=msg.high)
        return cls(msg.kind, tuple(shape), dtype, seed=msg.seed, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["shape"] = list(self.shape)
        return d


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out): (in, out) for a 2-D (in, out) weight; (out, in, kh, kw) for convolutions."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _key(seed: int, tensor: str) -> int:
    digest = hashlib.blake2b(tensor.encode(), digest_size=8).digest()
    return ((int(seed) & ((1 << 64) - 1)) << 64) | int.from_bytes(digest, "little")


def _block(kind: str, key: int, block: int, params: dict) -> np.ndarray:
    rng = np.random.Generator(np.random.Philox(key=key, counter=block))
    if kind == "normal":
        return rng.normal(params["mean"], params["std"], BLOCK)
    return rng.uniform(params["low"], params["high"], BLOCK)


def values(init: Init, tensor: str, offset: int = 0, length: int | None = None) -> np.ndarray:
    """Elements [offset, offset + length) of the flattened tensor, in ``init.dtype``."""
    n = math.prod(init.shape) if init.shape else 1
    if length is None:
        length = n - offset
    if offset < 0 or length < 0 or offset + length > n:
        raise InvalidArgument(f"initializer for '{tensor}': range [{offset}, {offset + length}) "
                              f"is outside the tensor's {n} elements")
    dtype = np.dtype(init.dtype)
    if init.kind == "zeros" or length == 0:  # an empty range needs no fans (an empty tensor has none)
        return np.zeros(length, dtype)
    if init.kind == "constant":
        return np.full(length, init.value, dtype)
    fan_in, fan_out = fans(init.shape)
    if init.kind == "normal":
        kind, params = "normal", {"mean": init.mean, "std": init.std}
    elif init.kind == "he_normal":
        kind, params = "normal", {"mean": 0.0, "std": math.sqrt(2.0 / fan_in)}
    elif init.kind == "glorot_uniform":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        kind, params = "uniform", {"low": -limit, "high": limit}
    else:
        kind, params = "uniform", {"low": init.low, "high": init.high}
    out = np.empty(length, dtype)
    key = _key(init.seed, tensor)
    pos = offset
    while pos < offset + length:
        b, start = divmod(pos, BLOCK)
        take = min(BLOCK - start, offset + length - pos)
        out[pos - offset: pos - offset + take] = _block(kind, key, b, params)[start:start + take]
        pos += take
    return out


def full(init: Init, tensor: str) -> np.ndarray:
    """The whole tensor, shaped."""
    return values(init, tensor).reshape(init.shape)
