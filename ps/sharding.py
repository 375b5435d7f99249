"""Which shard owns which slice of which parameter: a pure, deterministic function.

Every process (scheduler, client, worker) that computes ``plan`` for the same tensors,
shard count and slice limit gets the same answer. Large dense tensors are cut into
contiguous slices of at most ``max_slice_bytes`` (and spread over every shard once they
pass ``split_bytes``), small ones are placed whole, and slices go to shards
largest-first onto the least-loaded shard, so bytes per shard stay balanced.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence


#: a slice is what one push chunk updates under one lock: the same size as ps.rpc.DEFAULT_CHUNK_BYTES
DEFAULT_MAX_SLICE_BYTES = 2 << 20
#: tensors at least this large are cut into at least one slice per shard
DEFAULT_SPLIT_BYTES = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """A parameter's name, shape and dtype (a numpy dtype name)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact: np.prod would wrap around int64

    @property
    def itemsize(self) -> int:
        from ps.tensor import numpy_dtype, dtype_code
        return numpy_dtype(dtype_code(self.dtype)).itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize


@dataclass(frozen=True)
class Slice:
    """Elements [offset, offset + length) of the flattened tensor, held by ``shard``."""

    tensor: str
    offset: int
    length: int
    shard: int

    @property
    def stop(self) -> int:
        return self.offset + self.length


def slice_count(n: int, itemsize: int, num_shards: int, max_slice_bytes: int = DEFAULT_MAX_SLICE_BYTES,
                split_bytes: int = DEFAULT_SPLIT_BYTES) -> int:
    """How many slices ``plan`` cuts a tensor of ``n`` elements into (arithmetic only, so a
    request can be checked before anything is planned)."""
    max_elems = max(1, max_slice_bytes // itemsize)
    k = max(1, -(-n // max_elems))
    if n * itemsize >= split_bytes and k < num_shards:
        k = min(num_shards, max(1, n))
    return k


def split_lengths(n: int, pieces: int) -> list[int]:
    """``n`` cut into ``pieces`` contiguous lengths that differ by at most one."""
    base, extra = divmod(n, pieces)
    return [base + (1 if i < extra else 0) for i in range(pieces)]


def plan(tensors: Sequence[TensorSpec], num_shards: int,
         max_slice_bytes: int = DEFAULT_MAX_SLICE_BYTES,
         split_bytes: int = DEFAULT_SPLIT_BYTES) -> list[Slice]:
    """The shard map: every element of every tensor owned by exactly one shard.

    Slices come back ordered by tensor (in the given order) and offset.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if max_slice_bytes < 1:
        raise ValueError(f"max_slice_bytes must be >= 1, got {max_slice_bytes}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        raise ValueError(f"duplicate tensor names: {dup}")
    pieces: list[tuple[int, int, int, int]] = []  # (nbytes, tensor index, offset, length)
    for ti, t in enumerate(tensors):
        n, item = t.size, t.itemsize
        k = slice_count(n, item, num_shards, max_slice_bytes, split_bytes)
        offset = 0
        for length in split_lengths(n, k):
            pieces.append((length * item, ti, offset, length))
            offset += length
    # Largest first onto the least-loaded shard (ties: lower shard index); stable order.
    order = sorted(pieces, key=lambda p: (-p[0], p[1], p[2]))
    loads = [(0, s) for s in range(num_shards)]
    heapq.heapify(loads)
    out: list[Slice] = []
    for nbytes, ti, offset, length in order:
        load, shard = heapq.heappop(loads)
        out.append(Slice(tensors[ti].name, offset, length, shard))
        heapq.heappush(loads, (load + nbytes, shard))
    index = {name: i for i, name in enumerate(names)}
    out.sort(key=lambda s: (index[s.tensor], s.offset))
    return out


def bytes_per_shard(tensors: Iterable[TensorSpec], slices: Iterable[Slice], num_shards: int) -> list[int]:
    """Parameter bytes each shard holds under a plan."""
    item = {t.name: t.itemsize for t in tensors}
    loads = [0] * num_shards
    for s in slices:
        loads[s.shard] += s.length * item[s.tensor]
    return loads


def iter_chunks(offset: int, length: int, itemsize: int, max_chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Cut [offset, offset + length) into (offset, length) runs of at most max_chunk_bytes, one at a
    time (however many there are, nothing is built up front)."""
    per = max(1, max_chunk_bytes // itemsize)
    if length <= 0:
        yield offset, 0
        return
    for o in range(offset, offset + length, per):
        yield o, min(per, offset + length - o)


def chunks(offset: int, length: int, itemsize: int, max_chunk_bytes: int) -> list[tuple[int, int]]:
    """Cut [offset, offset + length) into (offset, length) runs of at most max_chunk_bytes."""
    return list(iter_chunks(offset, length, itemsize, max_chunk_bytes))


# -- sparse rows: which shard owns an int64 id ---------------------------------------------------
# Clients and servers must agree on these bit for bit: they are integer arithmetic only (numpy
# uint64, wrapping mod 2**64), so every process on every platform computes the same values.

#: splitmix64's increment (2**64 / golden ratio) and its finaliser's two multipliers (Steele,
#: Lea and Flood 2014; the constants of Vigna's reference splitmix64.c)
SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def mix64(z):
    """splitmix64's finaliser of a uint64 array, elementwise (a bijection of 64-bit words):
    z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31,
    all mod 2**64. Returns a new array; ``z`` is left as it is."""
    import numpy as np
    z = np.array(z, np.uint64)  # a copy: the in-place steps below leave the caller's alone
    t = z >> np.uint64(30)      # the one scratch array, reused by each shift
    z ^= t
    z *= np.uint64(_MIX1)
    np.right_shift(z, np.uint64(27), out=t)
    z ^= t
    z *= np.uint64(_MIX2)
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    return z


def splitmix64(x):
    """The first output of splitmix64 seeded with each element of ``x`` (int64 ids are taken as
    their two's-complement bit patterns): mix64(x + SPLITMIX64_GAMMA). splitmix64(0) is
    0xE220A8397B1DCDAF, as in Vigna's splitmix64.c."""
    import numpy as np
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise ValueError(f"splitmix64 needs integers, got {x.dtype}")
    u = x.astype(np.int64, copy=False).view(np.uint64) if x.dtype.kind == "i" else x.astype(np.uint64, copy=False)
    return mix64(u + np.uint64(SPLITMIX64_GAMMA))


def row_shards(ids, n: int):
    """The shard in [0, n) that owns each int64 id: splitmix64(id) mod n, as an int64 array.

    Pure and the same in every process: a client routes a row's pull or push with it and the
    server that owns the row computes the same answer. The mix spreads any id pattern
    (consecutive ids, ids that share low bits, hashed feature ids) evenly over the shards;
    negative ids and the int64 extremes are ordinary ids. Changing the function (or n) moves
    rows between shards, so it is fixed: tests pin its values."""
    import numpy as np
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"row_shards: the shard count must be an integer >= 1, got {n!r}")
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.dtype.kind not in "iu" and ids.size):
        raise ValueError(f"row_shards: ids must be a 1-D integer array, got {ids.dtype}{list(ids.shape)}")
    if ids.size == 0:
        return np.zeros(0, np.int64)
    return (splitmix64(ids.astype(np.int64, copy=False)) % np.uint64(n)).astype(np.int64)


def split_rows(ids, n: int) -> list:
    """Per shard s in [0, n), the positions in ``ids`` of the ids that shard s owns (row_shards),
    in their order in ``ids``: ``ids[split_rows(ids, n)[s]]`` is what to send to shard s."""
    import numpy as np
    shards = row_shards(ids, n)
    order = np.argsort(shards, kind="stable")  # stable: positions stay in request order per shard
    counts = np.bincount(shards, minlength=n)
    return np.split(order, np.cumsum(counts)[:-1])
