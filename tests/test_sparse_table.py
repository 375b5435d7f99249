"""Sparse tables (ps.server.sparse) and row sharding (ps.sharding.row_shards): exact values
against references written here from the definitions (splitmix64, torch's update rules, the
FTRL-Proximal paper's per-coordinate pseudo-code)."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest

from ps.errors import InvalidArgument
from ps.initializers import Init
from ps.optimizer_config import OptimizerConfig
from ps.server.sparse import RowInit, SparseTable, TableSpec, initial_rows, sparse_config
from ps.sharding import row_shards, split_rows, splitmix64

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


# -- pure-Python references ----------------------------------------------------------------------
def ref_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_splitmix(x: int) -> int:
    return ref_mix((x + GAMMA) & M64)


def ref_uniforms(seed: int, id_: int, cols: int) -> list[float]:
    row_key = ref_splitmix((id_ & M64) ^ ref_splitmix(seed))
    return [(ref_mix((row_key + (j + 1) * GAMMA) & M64) >> 11) * 2.0 ** -53 for j in range(cols)]


def ref_normal_row(init: RowInit, id_: int, width: int) -> list[float]:
    h = (width + 1) // 2
    u = ref_uniforms(init.seed, id_, 2 * h)
    r = [math.sqrt(-2.0 * math.log1p(-u[k])) for k in range(h)]
    cos = [init.mean + init.std * r[k] * math.cos(2 * math.pi * u[h + k]) for k in range(h)]
    sin = [init.mean + init.std * r[k] * math.sin(2 * math.pi * u[h + k]) for k in range(h)]
    return (cos + sin)[:width] if width % 2 == 0 else cos + sin[:h - 1]


def snap_equal(a, b, counts: bool = True) -> bool:
    (arr_a, meta_a), (arr_b, meta_b) = a, b
    if not counts:
        meta_a, meta_b = dict(meta_a, counts=None), dict(meta_b, counts=None)
    return (arr_a.keys() == arr_b.keys() and meta_a == meta_b
            and all(arr_a[k].dtype == arr_b[k].dtype and np.array_equal(arr_a[k], arr_b[k]) for k in arr_a))


def i64(*xs) -> np.ndarray:
    return np.array(xs, np.int64)


# -- row sharding ----------------------------------------------------------------------------------
def test_splitmix64_matches_the_reference_generator():
    # splitmix64.c's first outputs for seeds 0 and 1234567
    assert int(splitmix64(i64(0))[0]) == 0xE220A8397B1DCDAF
    assert int(splitmix64(i64(1234567))[0]) == 6457827717110365317
    ids = i64(0, 1, -1, 2**63 - 1, -2**63, 987654321987)
    assert [int(v) for v in splitmix64(ids)] == [ref_splitmix(int(x) & M64) for x in ids]


def test_row_shards_are_pinned():
    ids = i64(0, 1, 2, -1, 2**63 - 1, -2**63, 12345)
    assert row_shards(ids, 8).tolist() == [7, 1, 6, 0, 7, 3, 0]
    assert row_shards(ids, 1000003).tolist() == [4995, 745530, 320279, 55612, 953673, 797915, 741225]
    assert row_shards(ids, 1).tolist() == [0] * 7
    assert row_shards(ids, 8).dtype == np.int64 and row_shards(i64(), 3).shape == (0,)


@pytest.mark.parametrize("ids", [np.arange(100_000, dtype=np.int64),
                                 np.arange(100_000, dtype=np.int64) * 1024 - 2**40,  # shared low bits
                                 np.random.default_rng(1).integers(-2**63, 2**63 - 1, 100_000, dtype=np.int64)])
def test_row_shards_spread_evenly_over_8_shards(ids):
    counts = np.bincount(row_shards(ids, 8), minlength=8)
    assert counts.sum() == len(ids) and (np.abs(counts - len(ids) / 8) <= 0.1 * len(ids) / 8).all(), counts


def test_split_rows_partitions_positions_in_order():
    ids = np.random.default_rng(2).integers(-1000, 1000, 500).astype(np.int64)
    parts = split_rows(ids, 5)
    assert len(parts) == 5 and sorted(np.concatenate(parts).tolist()) == list(range(500))
    for s, pos in enumerate(parts):
        assert (np.diff(pos) > 0).all() and (row_shards(ids[pos], 5) == s).all()


def test_row_shards_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shard count"):
        row_shards(i64(1), 0)
    with pytest.raises(ValueError, match="integer"):
        row_shards(np.array([1.5]), 2)


# -- initial rows ----------------------------------------------------------------------------------
INIT_NORMAL = RowInit("normal", seed=11, mean=0.0, std=0.1)


@pytest.mark.parametrize("init", [INIT_NORMAL, RowInit("uniform", seed=5, low=-1.0, high=0.5),
                                  RowInit("constant", value=0.25), RowInit()])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_initial_rows_do_not_depend_on_the_batch_or_the_table(init, dtype):
    ids = i64(5, -9, 2**62, 0, 77, -2**63)
    alone = np.concatenate([initial_rows(init, ids[i:i + 1], 7, dtype) for i in range(len(ids))])
    perm = np.array([3, 0, 5, 2, 4, 1])
    assert alone.dtype == np.dtype(dtype)
    assert np.array_equal(initial_rows(init, ids, 7, dtype), alone)
    assert np.array_equal(initial_rows(init, ids[perm], 7, dtype), alone[perm])
    # two tables (two servers), asked in different orders and mixes; one stores rows, one does not
    a = SparseTable(TableSpec("emb", 7, dtype, init))
    b = SparseTable(TableSpec("emb", 7, dtype, init, admit_after=5))
    got_a = a.pull(np.concatenate([ids[perm], i64(123, 5)]))
    got_b = b.pull(ids)
    assert np.array_equal(got_a[:6], alone[perm]) and np.array_equal(got_b, alone)
    assert np.array_equal(got_a[7], alone[0])
    assert a.stats()["rows"] == 7 and b.stats()["rows"] == 0


def test_uniform_rows_equal_the_reference_bit_for_bit():
    init = RowInit("uniform", seed=2**64 - 1, low=-0.5, high=2.0)
    ids = i64(0, 1, -1, 2**63 - 1)
    rows = initial_rows(init, ids, 5, "float64")
    for r, x in enumerate(ids.tolist()):
        assert rows[r].tolist() == [u * (init.high - init.low) + init.low for u in ref_uniforms(init.seed, x, 5)]


@pytest.mark.parametrize("width", [1, 6, 7])
def test_normal_rows_equal_box_muller_on_the_stream(width):
    ids = i64(3, -4, 2**40)
    rows = initial_rows(INIT_NORMAL, ids, width, "float64")
    for r, x in enumerate(ids.tolist()):
        np.testing.assert_allclose(rows[r], ref_normal_row(INIT_NORMAL, x, width), rtol=0, atol=1e-15)


def test_initial_rows_have_the_asked_distribution():
    ids = np.arange(20_000, dtype=np.int64)
    z = initial_rows(RowInit("normal", seed=1, mean=2.0, std=0.5), ids, 8, "float64")
    assert abs(z.mean() - 2.0) < 0.01 and abs(z.std() - 0.5) < 0.005
    assert np.abs(np.corrcoef(z[:, 0], z[:, 4])[0, 1]) < 0.03  # a cosine and its sine column
    u = initial_rows(RowInit("uniform", seed=1, low=-1.0, high=3.0), ids, 8, "float64")
    assert u.min() >= -1.0 and u.max() < 3.0 and abs(u.mean() - 1.0) < 0.02
    other_seed = initial_rows(RowInit("normal", seed=2, mean=2.0, std=0.5), ids[:10], 8, "float64")
    assert not np.isclose(other_seed, z[:10]).any()


# -- optimizers against per-row references ----------------------------------------------------------
POOL = i64(-3, 0, 7, 2**40, 11, -2**63)


def pushes(width: int, n: int = 6, seed: int = 0):
    """(ids, grads, scale) with repeats within pushes and ids missing from some pushes."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n):
        ids = rng.choice(POOL, size=int(rng.integers(3, 9)))
        ids[:2] = POOL[p % 3]  # at least one id repeated
        out.append((ids.astype(np.int64), rng.normal(size=(len(ids), width)), [1.0, 0.5, 2.0][p % 3]))
    return out


def ref_run(init: RowInit, width: int, steps, update, state0):
    """Rows and states after ``steps``: gradients summed per id in request order, scaled, then
    ``update(w, state, g, t)`` once per distinct id, t the id's own update count."""
    rows, states, counts = {}, {}, {}
    for ids, grads, scale in steps:
        summed = {}
        for x, g in zip(ids.tolist(), grads):
            summed[x] = summed[x] + g if x in summed else g.copy()
        for x, g in summed.items():
            if x not in rows:
                rows[x] = initial_rows(init, i64(x), width, "float64")[0]
                states[x] = state0(rows[x])
                counts[x] = 0
            counts[x] += 1
            rows[x] = update(rows[x], states[x], g * scale, counts[x])
    return rows, states, counts


def sgd_ref(lr):
    def update(w, s, g, t):
        return w - lr * g
    return update


def adagrad_ref(lr, eps, lr_decay):
    def update(w, s, g, t):
        s["sum"] = s["sum"] + g * g
        return w - lr / (1 + (t - 1) * lr_decay) * g / (np.sqrt(s["sum"]) + eps)
    return update


def adam_ref(lr, b1, b2, eps):
    def update(w, s, g, t):  # Kingma and Ba with torch's eps placement
        s["exp_avg"] = b1 * s["exp_avg"] + (1 - b1) * g
        s["exp_avg_sq"] = b2 * s["exp_avg_sq"] + (1 - b2) * g * g
        m_hat = s["exp_avg"] / (1 - b1 ** t)
        v_hat = s["exp_avg_sq"] / (1 - b2 ** t)
        return w - lr * m_hat / (np.sqrt(v_hat) + eps)
    return update


CASES = {
    "sgd": ({"name": "sgd", "lr": 0.1}, sgd_ref(0.1), lambda w: {}),
    "adagrad": ({"name": "adagrad", "lr": 0.1, "initial_accumulator_value": 0.1, "lr_decay": 0.05},
                adagrad_ref(0.1, 1e-10, 0.05), lambda w: {"sum": np.full_like(w, 0.1)}),
    "adam": ({"name": "adam", "lr": 0.01, "beta1": 0.8, "beta2": 0.99},
             adam_ref(0.01, 0.8, 0.99, 1e-8), lambda w: {"exp_avg": np.zeros_like(w), "exp_avg_sq": np.zeros_like(w)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_matches_a_per_row_reference(name):
    config, update, state0 = CASES[name]
    width = 5
    table = SparseTable(TableSpec("emb", width, "float64", INIT_NORMAL), config)
    steps = pushes(width)
    for i, (ids, grads, scale) in enumerate(steps):
        assert table.push(ids, grads, "w0", i + 1, scale)
    rows, states, counts = ref_run(INIT_NORMAL, width, steps, update, state0)
    ids = np.array(list(rows), np.int64)
    np.testing.assert_allclose(table.pull(ids), np.array([rows[x] for x in ids.tolist()]), rtol=0, atol=1e-6)
    arrays, _ = table.snapshot()
    order = [arrays["ids"].tolist().index(x) for x in ids.tolist()]
    assert arrays["row_steps"][order].tolist() == [counts[x] for x in ids.tolist()]
    assert len(set(counts.values())) > 1  # rows do have different step counts (per-row bias correction)
    for k in states[ids[0]]:
        np.testing.assert_allclose(arrays[f"state.{k}"][order], np.array([states[x][k] for x in ids.tolist()]),
                                   rtol=0, atol=1e-6)


def test_optimizer_config_objects_are_accepted_with_their_defaults():
    assert sparse_config(OptimizerConfig(name="adagrad")) == {
        "name": "adagrad", "lr": 1e-2, "eps": 1e-10, "initial_accumulator_value": 0.0, "lr_decay": 0.0}
    assert sparse_config({"name": "adam"}) == {"name": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    assert sparse_config(None) == {"name": "sgd", "lr": 1e-3}
    assert sparse_config({"name": "ftrl", "l1": 0.5}) == {"name": "ftrl", "lr": 0.1, "beta": 1.0, "l1": 0.5, "l2": 0.0}
    assert sparse_config({"name": "ftrl", "alpha": 0.3}) == sparse_config({"name": "ftrl", "lr": 0.3})  # the paper's name


def ftrl_reference(alpha, beta, l1, l2, w0, steps):
    """McMahan et al. 2013, Algorithm 1, one coordinate at a time. ``w0``: id -> initial weights,
    which set z so that the weights formula gives w0 (z = 0 for w0 = 0, as in the paper)."""
    z, n = {}, {}
    for ids, grads, scale in steps:
        summed = {}
        for x, g in zip(ids.tolist(), grads):
            summed[x] = summed[x] + g if x in summed else g.copy()
        for x, g in summed.items():
            if x not in z:
                z[x] = [-(w * (beta / alpha + l2) + math.copysign(l1, w)) if w != 0 else 0.0 for w in w0[x]]
                n[x] = [0.0] * len(w0[x])
            for i, gi in enumerate((g * scale).tolist()):
                if abs(z[x][i]) <= l1:
                    wi = 0.0
                else:
                    wi = -(z[x][i] - math.copysign(l1, z[x][i])) / ((beta + math.sqrt(n[x][i])) / alpha + l2)
                sigma = (math.sqrt(n[x][i] + gi * gi) - math.sqrt(n[x][i])) / alpha
                z[x][i] += gi - sigma * wi
                n[x][i] += gi * gi

    def weights(x):
        return [0.0 if abs(zi) <= l1 else -(zi - math.copysign(l1, zi)) / ((beta + math.sqrt(ni)) / alpha + l2)
                for zi, ni in zip(z[x], n[x])]
    return {x: weights(x) for x in z}, z, n


@pytest.mark.parametrize("init", [RowInit(), INIT_NORMAL])
def test_ftrl_matches_the_papers_per_coordinate_algorithm(init):
    alpha, beta, l1, l2 = 0.5, 1.0, 1.5, 0.1
    width = 6
    table = SparseTable(TableSpec("ctr", width, "float64", init),
                        {"name": "ftrl", "lr": alpha, "beta": beta, "l1": l1, "l2": l2})
    steps = pushes(width, n=8, seed=3)
    ids = np.unique(np.concatenate([s[0] for s in steps]))
    w0 = dict(zip(ids.tolist(), table.pull(ids)))  # a pull before any push: the initial rows
    assert np.array_equal(np.array(list(w0.values())), initial_rows(init, ids, width, "float64"))
    for i, (x, g, s) in enumerate(steps):
        assert table.push(x, g, "w0", i, s)
    want, z, n = ftrl_reference(alpha, beta, l1, l2, w0, steps)
    got = table.pull(ids)
    np.testing.assert_allclose(got, np.array([want[x] for x in ids.tolist()]), rtol=0, atol=1e-6)
    arrays, _ = table.snapshot()
    order = [arrays["ids"].tolist().index(x) for x in ids.tolist()]
    np.testing.assert_allclose(arrays["state.z"][order], np.array([z[x] for x in ids.tolist()]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays["state.n"][order], np.array([n[x] for x in ids.tolist()]), rtol=0, atol=1e-6)
    sparse = np.abs(arrays["state.z"][order]) <= l1
    assert 0 < sparse.sum() < sparse.size  # l1 zeroes some coordinates, not all
    assert (got[sparse] == 0.0).all() and (got[~sparse] != 0.0).all()


def test_float32_table_tracks_the_float64_reference():
    config, update, state0 = CASES["adam"]
    table = SparseTable(TableSpec("emb", 4, "float32", INIT_NORMAL), config)
    steps = pushes(4)
    for i, (ids, grads, scale) in enumerate(steps):
        table.push(ids, grads.astype(np.float32), "w", i, scale)
    rows, _, _ = ref_run(INIT_NORMAL, 4, steps, update, state0)
    ids = np.array(list(rows), np.int64)
    got = table.pull(ids)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.array([rows[x] for x in ids.tolist()]), rtol=0, atol=1e-5)


# -- exactly once ----------------------------------------------------------------------------------
def test_a_replayed_push_changes_nothing():
    table = SparseTable(TableSpec("emb", 3, "float64", INIT_NORMAL), {"name": "adam"})
    g = np.ones((2, 3))
    assert table.push(i64(1, 2), g, "a", 5)
    before = table.snapshot()
    assert not table.push(i64(1, 2), g, "a", 5)
    assert not table.push(i64(1, 9), g, "a", 4)  # older seq: also a duplicate, id 9 not created
    assert snap_equal(before, table.snapshot(), counts=False)
    assert table.stats()["duplicates"] == 2 and table.stats()["rows"] == 2
    assert table.push(i64(1, 2), g, "b", 5)  # same seq, another client: applied
    assert table.push(i64(1, 2), g, "a", 6)
    assert table.stats()["step"] == 3


def test_applied_pushes_equal_acknowledged_ones_under_retries():
    rng = np.random.default_rng(4)
    spec = TableSpec("emb", 4, "float64", INIT_NORMAL)
    table, once = SparseTable(spec, {"name": "adagrad"}), SparseTable(spec, {"name": "adagrad"})
    sent = {c: 0 for c in ("a", "b", "c")}
    acked, data = 0, {}
    for _ in range(150):
        c = str(rng.choice(list(sent)))
        if sent[c] and rng.random() < 0.4:  # a retry: of the last push, or a stale one
            seq = int(rng.integers(max(1, sent[c] - 2), sent[c] + 1))
        else:
            sent[c] += 1
            seq = sent[c]
            data[c, seq] = (rng.integers(-5, 5, 4).astype(np.int64), rng.normal(size=(4, 4)))
            assert once.push(*data[c, seq], c, seq)
        acked += table.push(*data[c, seq], c, seq)
    assert acked == sum(sent.values()) == table.stats()["step"]
    assert table.stats()["duplicates"] == 150 - acked
    assert snap_equal(table.snapshot(), once.snapshot(), counts=False)


def test_concurrent_pushes_are_all_applied():
    table = SparseTable(TableSpec("emb", 8, "float64"), {"name": "sgd", "lr": 1.0})
    rng = np.random.default_rng(5)
    work = {t: [(rng.integers(0, 50, 40).astype(np.int64), rng.integers(-3, 4, (40, 8)).astype(np.float64))
                for _ in range(30)] for t in range(4)}

    def worker(t):
        for seq, (ids, g) in enumerate(work[t]):
            assert table.push(ids, g, f"w{t}", seq)
            table.pull(ids[:5])
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    want = np.zeros((50, 8))
    for jobs in work.values():
        for ids, g in jobs:
            np.add.at(want, ids, -g)  # integers: exact in any order
    ids = np.arange(50, dtype=np.int64)
    held = np.isin(ids, np.concatenate([i for jobs in work.values() for i, _ in jobs]))
    assert np.array_equal(table.pull(ids[held]), want[held]) and table.stats()["step"] == 120


# -- admission and eviction ------------------------------------------------------------------------
def test_an_id_is_stored_on_its_third_push():
    init = RowInit("uniform", seed=9)
    table = SparseTable(TableSpec("emb", 4, "float64", init, admit_after=3), {"name": "sgd", "lr": 0.1})
    w0 = initial_rows(init, i64(42), 4, "float64")[0]
    g = [np.full((1, 4), v) for v in (1.0, 2.0, 4.0, 8.0)]
    assert np.array_equal(table.pull(i64(42)), [w0])
    assert table.stats() | {"bytes": 0} == table.stats() | {"bytes": 0, "rows": 0, "pending": 0, "admitted": 0}
    assert table.push(i64(42), g[0], "c", 1)
    assert table.stats()["rows"] == 0 and table.stats()["pending"] == 1
    assert table.push(i64(42, 42), np.concatenate([g[1], g[1]]), "c", 2)  # one push: one sighting
    assert np.array_equal(table.pull(i64(42, 42)), [w0, w0]) and table.stats()["rows"] == 0
    assert table.push(i64(42, 7), np.concatenate([g[2], g[2]]), "c", 3)  # third sighting: stored, applied
    st = table.stats()
    assert (st["rows"], st["pending"], st["admitted"]) == (1, 1, 1)  # 7 is pending
    np.testing.assert_array_equal(table.pull(i64(42)), [w0 - 0.1 * 4.0])
    assert table.push(i64(42), g[3], "c", 4)
    np.testing.assert_allclose(table.pull(i64(42)), [w0 - 0.1 * 12.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", [0, 1])
def test_admit_after_0_or_1_stores_on_first_pull(k):
    table = SparseTable(TableSpec("emb", 2, admit_after=k))
    table.pull(i64(3, 3, 4))
    assert table.stats()["rows"] == 2 and table.stats()["admitted"] == 2


def test_rows_untouched_for_evict_after_steps_are_dropped():
    init = RowInit("normal", seed=4)
    table = SparseTable(TableSpec("emb", 3, "float64", init, evict_after=3), {"name": "sgd", "lr": 1.0})
    g = np.ones((3, 3))
    table.push(i64(1, 2, 3), g, "c", 1)        # step 1: 1, 2, 3 touched
    table.push(i64(3), g[:1], "c", 2)         # step 2
    table.pull(i64(2))                        # touched at step 2
    table.push(i64(3), g[:1], "c", 3)         # step 3: 1 idle for 2 steps
    assert table.evict() == 0
    bytes_before = table.stats()["bytes"]
    table.push(i64(3), g[:1], "c", 4)         # step 4: 1 idle for 3 steps
    assert table.evict() == 1
    st = table.stats()
    # storage is counted as allocated: it shrinks only after a big eviction
    assert (st["rows"], st["evicted"], st["admitted"]) == (2, 1, 3) and st["bytes"] <= bytes_before
    np.testing.assert_array_equal(table.pull(i64(2)), initial_rows(init, i64(2), 3, "float64") - 1.0)
    table.push(i64(3), g[:1], "c", 5)
    table.push(i64(3), g[:1], "c", 6)         # step 6: 2 idle since step 2 (its pull at 4 came first)
    assert table.evict() == 0
    table.push(i64(3), g[:1], "c", 7)
    assert table.evict() == 1
    # an evicted id comes back as its initial row
    np.testing.assert_array_equal(table.pull(i64(1, 2)), initial_rows(init, i64(1, 2), 3, "float64"))
    assert table.stats()["rows"] == 3 and table.stats()["admitted"] == 5


def test_eviction_keeps_every_surviving_row_intact():
    rng = np.random.default_rng(6)
    table = SparseTable(TableSpec("emb", 5, "float64", INIT_NORMAL, evict_after=2), {"name": "adam"})
    ids = rng.permutation(2000).astype(np.int64) - 1000
    table.push(ids, rng.normal(size=(2000, 5)), "c", 1)
    keep = rng.choice(ids, 300, replace=False)
    table.push(keep, rng.normal(size=(300, 5)), "c", 2)
    table.push(i64(), np.zeros((0, 5)), "c", 3)
    before = table.pull(keep)
    assert table.evict() == 1700
    assert table.stats()["rows"] == 300 and table.stats()["bytes"] < 2000 * 5 * 8 * 3
    assert np.array_equal(table.pull(keep), before)
    arrays, _ = table.snapshot()
    assert sorted(arrays["ids"].tolist()) == sorted(keep.tolist())


def test_pending_sightings_expire_too():
    table = SparseTable(TableSpec("emb", 2, admit_after=2, evict_after=2))
    table.push(i64(5), np.ones((1, 2)), "c", 1)
    table.push(i64(6), np.ones((1, 2)), "c", 2)
    table.push(i64(6), np.ones((1, 2)), "c", 3)
    assert table.stats()["pending"] == 1
    assert table.evict() == 0 and table.stats()["pending"] == 0
    table.push(i64(5), np.ones((1, 2)), "c", 4)  # counts from 1 again
    assert table.stats()["rows"] == 1 and table.stats()["pending"] == 1


# -- bad input -------------------------------------------------------------------------------------
BAD_PUSHES = {
    "wrong width": (lambda: (i64(1, 2), np.ones((2, 5))), {}, "shape"),
    "mismatched lengths": (lambda: (i64(1, 2, 3), np.ones((2, 4))), {}, r"shape \(3, 4\)"),
    "int32 ids": (lambda: (np.array([1, 2], np.int32), np.ones((2, 4))), {}, "int64"),
    "2-D ids": (lambda: (i64(1, 2).reshape(2, 1), np.ones((2, 4))), {}, "1-D int64"),
    "list ids": (lambda: ([1, 2], np.ones((2, 4))), {}, "int64"),
    "NaN gradient": (lambda: (i64(1, 2), np.array([[0, 1, 2, 3], [0, 0, np.nan, 0]])), {},
                     "non-finite value.*row 1, column 2"),
    "inf gradient": (lambda: (i64(1, 2), np.full((2, 4), np.inf)), {}, "non-finite"),
    "overflow": (lambda: (i64(1, 2), np.full((2, 4), 1e39)), {}, "overflow float32"),
    "complex gradient": (lambda: (i64(1, 2), np.ones((2, 4), complex)), {}, "real numbers"),
    "empty client": (lambda: (i64(1), np.ones((1, 4))), {"client_id": ""}, "client_id"),
    "negative seq": (lambda: (i64(1), np.ones((1, 4))), {"seq": -1}, "seq"),
    "negative scale": (lambda: (i64(1), np.ones((1, 4))), {"scale": -1.0}, "scale"),
    "NaN scale": (lambda: (i64(1), np.ones((1, 4))), {"scale": float("nan")}, "scale"),
}


@pytest.mark.parametrize("case", list(BAD_PUSHES))
def test_a_bad_push_is_refused_and_changes_nothing(case):
    make, kw, message = BAD_PUSHES[case]
    table = SparseTable(TableSpec("emb", 4, init=INIT_NORMAL, admit_after=2), {"name": "adam"})
    table.push(i64(1, 3), np.ones((2, 4), np.float32), "c", 1)
    table.push(i64(1), np.ones((1, 4), np.float32), "c", 2)
    before = table.snapshot()
    ids, grads = make()
    args = {"client_id": "c", "seq": 3} | kw
    with pytest.raises(InvalidArgument, match=message) as err:
        table.push(ids, grads, **args)
    assert "table 'emb'" in str(err.value)
    assert snap_equal(before, table.snapshot())
    assert table.push(i64(1), np.ones((1, 4), np.float32), "c", 3)  # the refused seq was not used up


def test_a_bad_pull_is_refused():
    table = SparseTable(TableSpec("emb", 4))
    with pytest.raises(InvalidArgument, match="ids must be a 1-D int64 array, got float64"):
        table.pull(np.array([1.0]))
    assert table.stats()["pulls"] == 0


@pytest.mark.parametrize("config,message", [
    ({"name": "lion"}, "unknown optimizer 'lion'"),
    ({"name": "momentum"}, "unknown optimizer 'momentum'"),
    ({"name": "adam", "weight_decay": 0.1}, "weight_decay"),
    ({"name": "sgd", "clip_value": 1.0}, "clip_value"),
    ({"name": "adam", "beta1": 1.0}, "beta1"),
    ({"name": "adam", "betas": 1.0}, "betas"),
    ({"name": "ftrl", "alpha": 0.0}, r"lr \(the paper's alpha\) must be > 0"),
    ({"name": "ftrl", "lr": 0.1, "alpha": 0.1}, "not both"),
    ({"name": "ftrl", "eps": 0.1}, "eps"),
    ({"name": "ftrl", "beta": 0.0}, "beta must be > 0"),
    ({"name": "ftrl", "l1": -1.0}, "l1"),
    (OptimizerConfig(name="rmsprop"), "unknown optimizer 'rmsprop'"),
])
def test_bad_optimizer_configs_are_named(config, message):
    with pytest.raises(InvalidArgument, match=message) as err:
        SparseTable(TableSpec("emb", 4), config)
    assert "table 'emb'" in str(err.value)


@pytest.mark.parametrize("kw,message", [
    ({"name": ""}, "name"),
    ({"width": 0}, "width"), ({"width": 65537}, "width"), ({"width": 2.0}, "width"), ({"width": True}, "width"),
    ({"dtype": "float16"}, "dtype"),
    ({"admit_after": -1}, "admit_after"), ({"evict_after": 1.5}, "evict_after"),
    ({"init": {"kind": "he_normal"}}, "unknown kind"),
    ({"init": Init("glorot_uniform", (3, 4))}, "fans"),
    ({"init": {"kind": "normal", "std": -1.0}}, "std"),
    ({"init": {"kind": "uniform", "low": 1.0, "high": 0.0}}, "low"),
    ({"init": {"kind": "normal", "seed": -1}}, "seed"),
    ({"init": {"kind": "constant", "value": float("inf")}}, "value"),
    ({"init": {"kind": "constant", "value": 1e300}}, "value"),
    ({"init": {"kind": "normal", "sigma": 1.0}}, "sigma"),
])
def test_bad_table_specs_are_named(kw, message):
    args = {"name": "emb", "width": 4} | kw
    with pytest.raises(InvalidArgument, match=message):
        TableSpec(**args)


def test_an_init_converts_to_a_row_init():
    spec = TableSpec("emb", 3, init=Init("normal", (10, 3), seed=4, mean=1.0, std=0.5))
    assert spec.init == RowInit("normal", seed=4, mean=1.0, std=0.5)


# -- snapshots -------------------------------------------------------------------------------------
def busy_table() -> SparseTable:
    table = SparseTable(TableSpec("emb", 6, "float32", INIT_NORMAL, admit_after=2, evict_after=3),
                        {"name": "ftrl", "l1": 0.01})
    rng = np.random.default_rng(7)
    for seq in range(12):
        ids = rng.integers(-40, 40, 30).astype(np.int64)
        table.push(ids, rng.normal(size=(30, 6)).astype(np.float32), f"w{seq % 3}", seq)
        if seq % 4 == 3:
            table.evict()
    return table


def test_snapshot_and_restore_round_trip_bit_exact(tmp_path):
    table = busy_table()
    arrays, meta = table.snapshot()
    st = table.stats()
    assert st["rows"] > 0 and st["pending"] > 0 and st["evicted"] > 0
    np.savez(tmp_path / "t.npz", **arrays)
    with np.load(tmp_path / "t.npz", allow_pickle=False) as f:
        loaded = {k: f[k] for k in f.files}
    restored = SparseTable.from_snapshot(loaded, json.loads(json.dumps(meta)))
    assert snap_equal((arrays, meta), restored.snapshot())
    assert restored.stats() | {"bytes": 0} == st | {"bytes": 0}  # bytes: the restored arrays hold no spare rows
    # both go on identically, and the exactly-once records came along
    ids = np.arange(-50, 50, dtype=np.int64)
    for t in (table, restored):
        assert not t.push(i64(1), np.ones((1, 6), np.float32), "w2", 11)
        t.push(ids, np.full((100, 6), 0.25, np.float32), "w9", 1)
        t.evict()
    assert np.array_equal(table.pull(ids), restored.pull(ids))
    assert snap_equal(table.snapshot(), restored.snapshot())


def test_restore_refuses_a_mismatched_snapshot():
    arrays, meta = busy_table().snapshot()
    other = SparseTable(TableSpec("emb", 6, "float32", INIT_NORMAL, admit_after=2, evict_after=3),
                        {"name": "ftrl", "l1": 0.01})
    other.push(i64(1, 1), np.ones((2, 6), np.float32), "x", 1)
    before = other.snapshot()
    bad = [({**arrays, "weights": arrays["weights"][:, :5]}, meta, "'weights' is float32"),
           ({**arrays, "state.z": arrays["state.z"].astype(np.float64)}, meta, "'state.z'"),
           ({k: v for k, v in arrays.items() if k != "state.n"}, meta, "arrays"),
           ({**arrays, "ids": np.zeros_like(arrays["ids"])}, meta, "repeated"),
           (arrays, {**meta, "spec": {**meta["spec"], "width": 7}}, "spec"),
           (arrays, {**meta, "optimizer": {"name": "sgd", "lr": 0.1}}, "optimizer"),
           (arrays, {**meta, "format": 99}, "format"),
           (arrays, {**meta, "applied": {"w0": -1}}, "seq of client")]
    for a, m, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            other.restore(a, m)
        assert snap_equal(before, other.snapshot())


def test_stats_count_bytes_of_rows_state_and_index():
    table = SparseTable(TableSpec("emb", 64, "float32"), {"name": "adam"})
    empty = table.stats()["bytes"]
    table.pull(np.arange(1000, dtype=np.int64))
    st = table.stats()
    per_row = 64 * 4 * 3 + 8 * 3  # weights, exp_avg, exp_avg_sq; id, row step, last touched
    assert st["rows"] == 1000 and 1000 * per_row + 1000 * 60 <= st["bytes"] - empty <= 3 * 1000 * per_row
