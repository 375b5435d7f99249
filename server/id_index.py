"""IdIndex: int64 id -> row number, an open-addressing hash table (linear probing) held in three numpy
arrays and probed for a whole batch of ids at once, so a sparse table's lookups cost numpy passes,
not one Python dict operation per id.

A slot is empty, used or gone (a deleted key: probes go past it, inserts may reuse it). The table
is rebuilt at twice the size needed whenever used and gone slots would pass half of it, so probe
runs stay short. Slots come from a splitmix64-style mix of the id with a constant of its own:
the shards pick ids by splitmix64(id) mod shards, so that hash's low bits are the same for every id
a shard holds, and would crowd a power-of-two table into a fraction of its slots.
"""

from __future__ import annotations

import numpy as np

from ps.sharding import mix64

EMPTY, USED, GONE = 0, 1, 2
#: added to the id before mixing (any odd constant other than splitmix64's gamma)
_SALT = np.uint64(0x632BE59BD9B4E019)


class IdIndex:
    """Distinct int64 ids, each with a row number."""

    def __init__(self, capacity: int = 64):
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        cap = 1 << max(6, int(capacity - 1).bit_length())
        self._keys = np.zeros(cap, np.int64)
        self._rows = np.zeros(cap, np.int64)
        self._state = np.zeros(cap, np.uint8)
        self._mask = np.uint64(cap - 1)
        self._used = 0
        self._gone = 0

    def __len__(self) -> int:
        return self._used

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._rows.nbytes + self._state.nbytes

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (mix64(keys.view(np.uint64) + _SALT) & self._mask).astype(np.int64)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """The slot holding each key, -1 where it is not held."""
        out = np.full(len(keys), -1, np.int64)
        active = np.arange(len(keys))
        pos = self._home(keys)
        mask = int(self._mask)
        while active.size:
            st = self._state[pos]
            hit = (st == USED) & (self._keys[pos] == keys[active])
            out[active[hit]] = pos[hit]
            go_on = ~hit & (st != EMPTY)
            active, pos = active[go_on], (pos[go_on] + 1) & mask
        return out

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The row of each id (int64 array), -1 where it is not held."""
        keys = np.ascontiguousarray(keys, np.int64)
        slots = self._find(keys)
        rows = np.full(len(keys), -1, np.int64)
        held = slots >= 0
        rows[held] = self._rows[slots[held]]
        return rows

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add ids that are not held (distinct) with their rows."""
        keys = np.ascontiguousarray(keys, np.int64)
        rows = np.ascontiguousarray(rows, np.int64)
        if 2 * (self._used + self._gone + len(keys)) > len(self._keys):
            self._rebuild(2 * (self._used + len(keys)))
        active = np.arange(len(keys))
        pos = self._home(keys)
        mask = int(self._mask)
        while active.size:
            free = np.flatnonzero(self._state[pos] != USED)
            if free.size:
                # ids at the same free slot all write their key; the one that stays takes the slot
                # (keys are distinct, so exactly one per slot), the others probe on
                slots, cand = pos[free], active[free]
                self._keys[slots] = keys[cand]
                won = self._keys[slots] == keys[cand]
                slots, cand = slots[won], cand[won]
                self._gone -= int(np.count_nonzero(self._state[slots] == GONE))
                self._state[slots] = USED
                self._rows[slots] = rows[cand]
                left = np.ones(len(active), bool)
                left[free[won]] = False
                active, pos = active[left], pos[left]
            pos = (pos + 1) & mask
        self._used += len(keys)

    def delete(self, keys: np.ndarray) -> None:
        """Forget ids (each held)."""
        slots = self._find(np.ascontiguousarray(keys, np.int64))
        if (slots < 0).any():
            raise KeyError(f"{int(np.count_nonzero(slots < 0))} id(s) to delete are not held")
        self._state[slots] = GONE
        self._used -= len(slots)
        self._gone += len(slots)

    def move(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Give held ids new rows."""
        slots = self._find(np.ascontiguousarray(keys, np.int64))
        if (slots < 0).any():
            raise KeyError(f"{int(np.count_nonzero(slots < 0))} id(s) to move are not held")
        self._rows[slots] = rows

    def _rebuild(self, capacity: int) -> None:
        held = self._state == USED
        keys, rows = self._keys[held], self._rows[held]
        self._alloc(2 * capacity)
        if len(keys):
            self.insert(keys, rows)

    @classmethod
    def of(cls, keys: np.ndarray, rows: np.ndarray) -> "IdIndex":
        """An index holding ``keys`` (distinct) with ``rows``."""
        index = cls(4 * len(keys))
        index.insert(keys, rows)
        return index
