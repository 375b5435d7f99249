"""IdIndex (the sparse tables' id -> row hash table) against a Python dict, through inserts,
deletes, moves and growth, with ids that collide in their low bits."""

from __future__ import annotations

import numpy as np
import pytest

from ps.server.id_index import IdIndex
from ps.sharding import row_shards


def check(index: IdIndex, ref: dict[int, int], probe: np.ndarray) -> None:
    got = index.lookup(probe)
    want = np.array([ref.get(int(x), -1) for x in probe], np.int64)
    np.testing.assert_array_equal(got, want)
    assert len(index) == len(ref)


def test_lookups_match_a_dict_through_inserts_deletes_moves_and_growth():
    rng = np.random.default_rng(0)
    index, ref = IdIndex(), {}
    extremes = np.array([0, -1, np.iinfo(np.int64).min, np.iinfo(np.int64).max], np.int64)
    for step in range(40):
        new = np.unique(np.concatenate([rng.integers(-2**63, 2**63 - 1, 500, dtype=np.int64),
                                        rng.integers(0, 5000, 200), extremes if step == 3 else []]).astype(np.int64))
        new = np.array([x for x in new.tolist() if x not in ref], np.int64)
        rows = rng.integers(0, 1 << 40, len(new))
        index.insert(new, rows)
        ref.update(zip(new.tolist(), rows.tolist()))
        held = np.array(list(ref), np.int64)
        gone = rng.choice(held, len(held) // 5, replace=False)
        index.delete(gone)
        for x in gone.tolist():
            del ref[x]
        held = np.array(list(ref), np.int64)
        moved = rng.choice(held, min(50, len(held)), replace=False)
        to = rng.integers(0, 1 << 40, len(moved))
        index.move(moved, to)
        ref.update(zip(moved.tolist(), to.tolist()))
        check(index, ref, np.concatenate([held, gone, rng.integers(0, 5000, 300)]))
    assert len(ref) > 2_000  # grown from 64 slots many times over
    assert index.nbytes <= 17 * 8 * len(ref)  # at most 8 slots an id, 17 bytes a slot


def test_ids_of_one_shard_spread_over_the_table():
    """A shard holds the ids whose splitmix64 is 0 mod shards: the index must not crowd them."""
    ids = np.arange(400_000, dtype=np.int64)
    mine = ids[row_shards(ids, 4) == 0]
    index = IdIndex.of(mine, np.arange(len(mine)))
    used = np.flatnonzero(index._state == 1)
    assert len(used) == len(mine)
    np.testing.assert_array_equal(index.lookup(mine), np.arange(len(mine)))
    # every quarter of the table holds about a quarter of the ids
    quarters = np.bincount(used * 4 // len(index._state), minlength=4) / len(mine)
    assert quarters.min() > 0.2


def test_deleting_or_moving_an_id_not_held_is_refused():
    index = IdIndex.of(np.array([5, 7], np.int64), np.array([0, 1]))
    with pytest.raises(KeyError, match="1 id"):
        index.delete(np.array([9], np.int64))
    with pytest.raises(KeyError, match="1 id"):
        index.move(np.array([9], np.int64), np.array([3]))
    np.testing.assert_array_equal(index.lookup(np.array([5, 7, 9], np.int64)), [0, 1, -1])
