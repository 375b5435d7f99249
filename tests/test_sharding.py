"""The shard map: deterministic, every element owned exactly once, bytes balanced."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps.sharding import TensorSpec, bytes_per_shard, chunks, plan, split_lengths


def ownership(tensors, slices):
    owned = {t.name: np.zeros(t.size, np.int32) for t in tensors}
    for s in slices:
        owned[s.tensor][s.offset:s.stop] += 1
    return owned


tensor_lists = st.lists(
    st.tuples(st.lists(st.integers(0, 20), min_size=0, max_size=3), st.sampled_from(["float32", "float64"])),
    min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(tensor_lists, st.integers(1, 7), st.integers(64, 4096))
def test_every_element_is_owned_exactly_once(shapes, shards, max_slice_bytes):
    tensors = [TensorSpec(f"t{i}", tuple(s), d) for i, (s, d) in enumerate(shapes)]
    slices = plan(tensors, shards, max_slice_bytes=max_slice_bytes, split_bytes=max_slice_bytes)
    for name, counts in ownership(tensors, slices).items():
        assert (counts == 1).all(), name
    assert all(0 <= s.shard < shards for s in slices)
    item = {t.name: t.itemsize for t in tensors}
    assert all(s.length * item[s.tensor] <= max(max_slice_bytes, item[s.tensor]) for s in slices)


@settings(max_examples=50, deadline=None)
@given(tensor_lists, st.integers(1, 7))
def test_plan_is_deterministic(shapes, shards):
    tensors = [TensorSpec(f"t{i}", tuple(s), d) for i, (s, d) in enumerate(shapes)]
    assert plan(tensors, shards, 256) == plan(list(tensors), shards, 256)


def test_bytes_are_balanced_for_a_model_with_many_tensors():
    rng = np.random.default_rng(0)
    tensors = [TensorSpec(f"layer{i}.w", (int(rng.integers(1, 2000)), int(rng.integers(1, 600))))
               for i in range(60)]
    tensors += [TensorSpec(f"layer{i}.b", (int(rng.integers(1, 600)),)) for i in range(60)]
    for shards in (2, 3, 4, 8):
        loads = bytes_per_shard(tensors, plan(tensors, shards), shards)
        assert max(loads) <= 1.1 * np.mean(loads), (shards, loads)


def test_one_large_tensor_is_spread_over_every_shard():
    t = TensorSpec("w", (64 << 20 >> 2,))
    slices = plan([t], 2, max_slice_bytes=4 << 20)
    assert len(slices) == 16 and {s.shard for s in slices} == {0, 1}
    assert bytes_per_shard([t], slices, 2) == [32 << 20, 32 << 20]


def test_small_tensors_are_placed_whole():
    tensors = [TensorSpec("a", (10, 10)), TensorSpec("b", (5,))]
    slices = plan(tensors, 4)
    assert [(s.tensor, s.offset, s.length) for s in slices] == [("a", 0, 100), ("b", 0, 5)]


def test_duplicate_names_and_bad_shard_counts_are_rejected():
    with pytest.raises(ValueError, match=r"duplicate tensor names: \['a'\]"):
        plan([TensorSpec("a", (1,)), TensorSpec("a", (2,))], 2)
    with pytest.raises(ValueError, match="num_shards must be >= 1, got 0"):
        plan([TensorSpec("a", (1,))], 0)


def test_split_lengths_and_chunks_cover_the_range():
    assert split_lengths(10, 3) == [4, 3, 3]
    assert chunks(100, 10, 4, 16) == [(100, 4), (104, 4), (108, 2)]
