"""Sparse tables as a user declares them, and as they travel (the spec is plain data; the shards' storage is
ps.server.sparse): ``ps.SparseTable`` beside dense tensors
in ``Client.create_model``, and the conversions between the table's spec (``ps.server.sparse.TableSpec``,
which the shards keep) and its ``ps.v1.TableSpec`` message.

    model = client.create_model("ctr", {"emb": ps.SparseTable(16, ps.Init("normal", (), std=0.01, seed=1)),
                                        "w": np.zeros((16, 1), np.float32)}, optimizer="adagrad")
    rows = model.pull_rows("emb", ids)          # (len(ids), 16)
    model.push_rows("emb", ids, grads)          # repeated ids: their gradients are summed
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ps.errors import InvalidArgument
from ps.tensor import CodecError, dtype_code, numpy_dtype
from ps.v1 import server_pb2

ROW_INIT_KINDS = ("zeros", "constant", "normal", "uniform")
MAX_WIDTH = 65536
DTYPES = ("float32", "float64")


def _number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _integer(what: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise InvalidArgument(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


# -- initial rows ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowInit:
    """How a new row starts: "zeros", "constant" (value), "normal" (mean, std) or "uniform"
    (low, high), drawn from ``seed`` and the row's id alone (see ``initial_rows``)."""

    kind: str = "zeros"
    seed: int = 0
    value: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    low: float = -0.05
    high: float = 0.05

    def __post_init__(self):
        if self.kind not in ROW_INIT_KINDS:
            raise InvalidArgument(f"row init: unknown kind {self.kind!r}: expected one of {', '.join(ROW_INIT_KINDS)}")
        object.__setattr__(self, "seed", _integer("row init: seed", self.seed, 0, (1 << 64) - 1))
        for name in ("value", "mean", "std", "low", "high"):
            object.__setattr__(self, name, _number(f"row init: {name}", getattr(self, name)))
        if self.std < 0:
            raise InvalidArgument(f"row init: std must be >= 0, got {self.std}")
        if self.low > self.high:
            raise InvalidArgument(f"row init: low ({self.low}) must not exceed high ({self.high})")

    @classmethod
    def from_init(cls, init) -> RowInit:
        """The row initializer of a ps.initializers.Init (its shape is ignored: a row is 1-D)."""
        if init.kind not in ROW_INIT_KINDS:
            raise InvalidArgument(f"row init: {init.kind!r} needs a dense tensor's fans; a row takes one of "
                                  f"{', '.join(ROW_INIT_KINDS)}")
        return cls(init.kind, init.seed, init.value, init.mean, init.std, init.low, init.high)

    @classmethod
    def from_dict(cls, d: Mapping) -> RowInit:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidArgument(f"row init: unknown option(s) {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- the table's spec ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableSpec:
    """A sparse table: its name, row width and dtype, how rows start, and its admission
    (``admit_after`` sightings) and eviction (``evict_after`` steps, 0: never) rules; see the
    module docstring for their exact meaning."""

    name: str
    width: int
    dtype: str = "float32"
    init: RowInit = field(default_factory=RowInit)
    admit_after: int = 0
    evict_after: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgument(f"table spec: name must be a non-empty string, got {self.name!r}")
        what = f"table '{self.name}'"
        object.__setattr__(self, "width", _integer(f"{what}: width", self.width, 1, MAX_WIDTH))
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"{what}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        init = self.init
        if isinstance(init, Mapping):
            init = RowInit.from_dict(init)
        elif not isinstance(init, RowInit) and hasattr(init, "kind") and hasattr(init, "shape"):
            init = RowInit.from_init(init)  # a ps.initializers.Init
        if not isinstance(init, RowInit):
            raise InvalidArgument(f"{what}: init must be a RowInit, an Init or a dict, got {init!r}")
        object.__setattr__(self, "init", init)
        # keep a draw representable: no normal draw strays 16 std, as ps.initializers checks
        top = float(np.finfo(np.dtype(self.dtype)).max) / 16
        for name in ("value", "mean", "std", "low", "high"):
            if abs(getattr(init, name)) > top:
                raise InvalidArgument(f"{what}: init {name} must be of magnitude at most {top:.3g} ({self.dtype}), "
                                      f"got {getattr(init, name)!r}")
        for name in ("admit_after", "evict_after"):
            object.__setattr__(self, name, _integer(f"{what}: {name}", getattr(self, name), 0, (1 << 62)))

    def to_dict(self) -> dict:
        """Plain JSON types."""
        d = dataclasses.asdict(self)
        d["init"] = self.init.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> TableSpec:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidArgument(f"table spec: unknown option(s) {sorted(unknown)}")
        return cls(**d)




@dataclass(frozen=True)
class SparseTable:
    """Rows of ``width`` values keyed by int64 ids from an unbounded space, created on first use from
    ``init`` (zeros, constant, normal or uniform; the same id starts with the same row everywhere),
    stored after ``admit_after`` pushes of an id (0: at once), dropped after ``evict_after`` of the
    table's steps untouched (0: never)."""

    width: int
    init: object = None       # a ps.Init (its shape is ignored), a RowInit, a dict or None (zeros)
    dtype: str = "float32"
    admit_after: int = 0
    evict_after: int = 0

    def spec(self, name: str) -> TableSpec:
        return TableSpec(name, self.width, self.dtype, RowInit() if self.init is None else self.init,
                         self.admit_after, self.evict_after)


def to_proto(spec: TableSpec) -> server_pb2.TableSpec:
    i = spec.init
    return server_pb2.TableSpec(
        name=spec.name, width=spec.width, dtype=dtype_code(np.dtype(spec.dtype)),
        init=server_pb2.Initializer(kind=i.kind, value=i.value, mean=i.mean, std=i.std, low=i.low, high=i.high,
                                    seed=i.seed),
        admit_after=spec.admit_after, evict_after=spec.evict_after)


def from_proto(t: server_pb2.TableSpec) -> TableSpec:
    """The spec a message carries (InvalidArgument naming the field when it is not one)."""
    i = t.init
    try:
        dtype = numpy_dtype(t.dtype).name if t.dtype else "float32"
    except CodecError as e:
        raise InvalidArgument(f"table '{t.name}': {e}") from None
    low, high = (i.low, i.high) if (i.low, i.high) != (0.0, 0.0) else (-0.05, 0.05)
    init = RowInit(i.kind or "zeros", i.seed, i.value, i.mean, i.std or 1.0, low, high)
    return TableSpec(t.name, t.width, dtype, init, t.admit_after, t.evict_after)


def check_tables(tables, what: str) -> list[TableSpec]:
    """The specs of ``tables`` (messages), checked: valid and with distinct names."""
    specs = [from_proto(t) for t in tables]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{what}: table names must be distinct, got {names}")
    return specs


def encode_ids(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def decode_ids(data: bytes, what: str, limit: int) -> np.ndarray:
    """int64 ids from ``data``; InvalidArgument when it is not a whole number of them or too many."""
    if len(data) % 8:
        raise InvalidArgument(f"{what}: ids must be int64 (8 bytes each), got {len(data)} bytes")
    if len(data) // 8 > limit:
        raise InvalidArgument(f"{what}: {len(data) // 8} ids, more than the {limit} one message may carry")
    return np.frombuffer(data, dtype="<i8").astype(np.int64, copy=False)
