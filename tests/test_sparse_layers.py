"""The worker's sparse layers (embedding, sparse_linear): gathering a batch's ids, finite-difference
gradients wrt the pulled rows and the dense parameters in float64, exact values against references
built from the full table, and the spec errors."""

from __future__ import annotations

import numpy as np
import pytest

from ps.worker import kernels
from ps.worker.model import Sequential
from ps.worker.xp import to_numpy

from conftest import numeric_grad, rel_error

EPS = 1e-6
TOL = 1e-6

# Padding (-1), an id repeated within an example, one example with no ids at all, and ids shared by examples.
IDS = np.array([[7, 3, -1, 7, 12],
                [-1, -1, -1, -1, -1],
                [3, 40, 40, 40, -1],
                [12, -1, 9, 3, 1000003]], np.int64)


def random_params(model: Sequential, ids: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """float64 dense parameters and, under each table's name, rows for ``ids``, all random."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(0, 0.5, s) for k, s in model.param_shapes().items()}
    for name, table in model.tables().items():
        params[name] = rng.normal(0, 0.5, (len(ids), table.width))
    return params


def labels_for(loss: str, n: int) -> np.ndarray:
    return np.array([0, 1, 2, 1][:n]) if loss == "softmax_cross_entropy" else np.array([1.0, 0.0, 1.0, 0.0][:n])


def head(loss: str) -> dict:
    return {"type": "dense", "units": 3 if loss == "softmax_cross_entropy" else 1}


LOSSES = ["softmax_cross_entropy", "binary_cross_entropy"]
SPECS = {
    "embedding(concat)": [{"type": "embedding", "width": 3, "combine": "concat"}],
    "embedding(sum)": [{"type": "embedding", "width": 3, "combine": "sum"}],
    "embedding(mean)": [{"type": "embedding", "width": 3, "combine": "mean"}],
    "ctr: embedding(concat) + dense + dense": [{"type": "embedding", "width": 2, "combine": "concat"},
                                               {"type": "dense", "units": 4, "activation": "tanh"}],
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_embedding_gradients_match_finite_differences(spec, loss):
    check_model_gradients(spec + [head(loss)], loss)


@pytest.mark.parametrize("loss,units", [("softmax_cross_entropy", 3), ("binary_cross_entropy", 1)])
def test_sparse_linear_gradients_match_finite_differences(loss, units):
    check_model_gradients([{"type": "sparse_linear", "units": units}], loss)


def check_model_gradients(spec, loss):
    model = Sequential.from_spec(spec, input_shape=(IDS.shape[1],), loss=loss)
    ids, local_x = model.gather(np, IDS)
    params = random_params(model, ids)
    y = labels_for(loss, len(IDS))

    def f():
        return model.loss_and_grads(np, params, local_x, y, loss, train=False)[0]

    _, grads, _ = model.loss_and_grads(np, params, local_x, y, loss, train=False)
    assert list(grads) == [*model.param_shapes(), *model.tables()]
    for name, p in params.items():
        assert grads[name].shape == p.shape and grads[name].dtype == np.float64, name
        assert rel_error(grads[name], numeric_grad(f, p)) < TOL, f"grad wrt {name}"


def test_sparse_linear_forward_is_the_one_hot_count_matrix_times_the_full_table():
    rng = np.random.default_rng(1)
    vocab, units = 50, 4
    x = rng.integers(0, vocab, (6, 9))
    x[rng.random(x.shape) < 0.3] = -1
    x[5] = -1
    # Small integers: every sum is exact in float64, whatever its order.
    table = rng.integers(-20, 20, (vocab, units)).astype(np.float64)
    b = rng.integers(-5, 5, units).astype(np.float64)
    counts = np.zeros((len(x), vocab))
    for e, row in enumerate(x):
        for i in row:
            if i != -1:
                counts[e, i] += 1
    model = Sequential.from_spec([{"type": "sparse_linear", "units": units}], input_shape=(9,))
    ids, local_x = model.gather(np, x)
    out = model.forward(np, {"0.sparse_linear.rows": table[ids], "0.sparse_linear.b": b}, local_x)
    np.testing.assert_array_equal(out, counts @ table + b)


def test_sparse_linear_row_gradients_are_the_count_matrix_transposed_times_the_output_gradient():
    rng = np.random.default_rng(2)
    x = np.array([[4, 4, 4, -1], [9, 4, -1, -1], [-1, -1, -1, -1]])
    counts = np.array([[3, 0], [1, 1], [0, 0]], np.float64)  # columns: ids 4 and 9
    model = Sequential.from_spec([{"type": "sparse_linear", "units": 2}], input_shape=(4,))
    ids, local_x = model.gather(np, x)
    assert ids.tolist() == [4, 9]
    params = {"0.sparse_linear.rows": rng.normal(size=(2, 2)), "0.sparse_linear.b": rng.normal(size=2)}
    out = model.forward(np, params, local_x)
    target = rng.normal(size=out.shape)
    _, grads, _ = model.loss_and_grads(np, params, local_x, target, "mse")
    g_out = 2 * (out - target) / out.size
    np.testing.assert_allclose(grads["0.sparse_linear.rows"], counts.T @ g_out, rtol=1e-12)
    np.testing.assert_allclose(grads["0.sparse_linear.b"], g_out.sum(axis=0), rtol=1e-12)


@pytest.mark.parametrize("combine", ["concat", "sum", "mean"])
def test_embedding_forward_values(combine):
    model = Sequential.from_spec([{"type": "embedding", "width": 2, "combine": combine}], input_shape=(3,))
    x = np.array([[5, -1, 5], [8, 5, -1], [-1, -1, -1]])
    ids, local_x = model.gather(np, x)
    table = {5: np.array([1.0, 2.0]), 8: np.array([10.0, 20.0])}
    rows = np.stack([table[int(i)] for i in ids])
    out = model.forward(np, {"0.embedding.rows": rows}, local_x)
    zero = np.zeros(2)
    expected = {
        "concat": [[1, 2, 0, 0, 1, 2], [10, 20, 1, 2, 0, 0], [0, 0, 0, 0, 0, 0]],
        "sum": [table[5] * 2, table[8] + table[5], zero],
        "mean": [table[5], (table[8] + table[5]) / 2, zero],
    }[combine]
    np.testing.assert_array_equal(out, np.array(expected, np.float64))


def test_gather_gives_sorted_distinct_ids_and_positions_that_map_back_to_the_input():
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 30, (64, 12))  # -3 and -2 are ids like any other: only -1 is padding
    model = Sequential.from_spec([{"type": "embedding", "width": 4}], input_shape=(12,))
    ids, local_x = model.gather(np, x)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(ids, np.unique(x[x != -1]))
    assert local_x.shape == x.shape and local_x.dtype == np.int64
    np.testing.assert_array_equal(local_x == -1, x == -1)
    np.testing.assert_array_equal(ids[local_x[x != -1]], x[x != -1])


@pytest.mark.parametrize("spec", [{"type": "embedding", "width": 3, "combine": c} for c in ("concat", "sum", "mean")]
                         + [{"type": "sparse_linear", "units": 3}], ids=lambda s: s.get("combine", s["type"]))
def test_an_all_padding_batch_pulls_no_rows_and_gives_zeros(spec):
    model = Sequential.from_spec([spec], input_shape=(4,))
    ids, local_x = model.gather(np, np.full((3, 4), -1))
    assert ids.shape == (0,) and ids.dtype == np.int64
    np.testing.assert_array_equal(local_x, -1)
    name = next(iter(model.tables()))
    params = {**model.init_params(0, np.float64), name: np.zeros((0, 3))}
    out = model.forward(np, params, local_x)
    np.testing.assert_array_equal(out, np.zeros((3, *model.output_shape)))
    _, grads, _ = model.loss_and_grads(np, params, local_x, np.zeros(out.shape), "mse")
    assert grads[name].shape == (0, 3)


def test_gather_rejects_inputs_that_are_not_ids_of_the_models_shape():
    model = Sequential.from_spec([{"type": "embedding", "width": 4}], input_shape=(3,))
    with pytest.raises(ValueError, match="ids must be integers, got float64"):
        model.gather(np, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"ids of shape \(2, 4\), expected \(n, 3\)"):
        model.gather(np, np.zeros((2, 4), np.int64))
    dense = Sequential.from_spec([{"type": "dense", "units": 2}], input_shape=(3,))
    with pytest.raises(ValueError, match=r"first layer \(dense\) reads features, not ids"):
        dense.gather(np, np.zeros((2, 3), np.int64))


def test_tables_are_named_like_parameters_but_are_not_parameters():
    model = Sequential.from_spec([{"type": "embedding", "width": 8, "combine": "concat", "init_std": 0.05},
                                  {"type": "dense", "units": 1}], input_shape=(5,))
    tables = model.tables(seed=7)
    assert list(tables) == ["0.embedding.rows"]
    emb = tables["0.embedding.rows"]
    assert (emb.width, emb.dtype, emb.init.kind, emb.init.std, emb.init.seed) == (8, "float32", "normal", 0.05, 7)
    assert emb.spec("emb").init.std == 0.05  # a valid ps.sparse TableSpec
    assert list(model.param_shapes()) == ["1.dense.w", "1.dense.b"] == list(model.init_params(0))
    assert model.param_shapes()["1.dense.w"] == (40, 1)
    assert model.reads_ids

    linear = Sequential.from_spec([{"type": "sparse_linear", "units": 2}], input_shape=(5,))
    rows = linear.tables(dtype=np.float64)["0.sparse_linear.rows"]
    assert (rows.width, rows.dtype, rows.init.kind) == (2, "float64", "zeros")
    assert linear.param_shapes() == {"0.sparse_linear.b": (2,)}
    assert linear.initializers(0)["0.sparse_linear.b"].kind == "zeros"

    # std 0 travels as zeros: a std of 0 in a ps.v1.Initializer would read as the default, 1
    flat = Sequential.from_spec([{"type": "embedding", "width": 2, "init_std": 0}], input_shape=(5,))
    assert flat.tables()["0.embedding.rows"].init.kind == "zeros"

    mlp = Sequential.from_spec([{"type": "dense", "units": 2}], input_shape=(5,))
    assert mlp.tables() == {} and not mlp.reads_ids


@pytest.mark.parametrize("spec,message", [
    ([{"type": "embedding", "width": 0}], "layer 0: embedding field 'width': expected a positive int, got 0"),
    ([{"type": "embedding"}], "layer 0: embedding needs field 'width'"),
    ([{"type": "embedding", "width": 4, "combine": "max"}],
     "layer 0: embedding field 'combine': expected one of concat, sum, mean, got 'max'"),
    ([{"type": "embedding", "width": 4, "init_std": -1}],
     "layer 0: embedding field 'init_std': expected a finite number >= 0, got -1"),
    ([{"type": "dense", "units": 4}, {"type": "embedding", "width": 4}],
     "layer 1: embedding must be the first layer: it reads ids"),
    ([{"type": "embedding", "width": 4}, {"type": "sparse_linear", "units": 1}],
     "layer 1: sparse_linear must be the first layer: it reads ids"),
    ([{"type": "sparse_linear"}], "layer 0: sparse_linear needs field 'units'"),
    ([{"type": "sparse_linear", "units": 1.5}], "layer 0: sparse_linear field 'units': expected a positive int"),
])
def test_bad_sparse_layer_specs_are_rejected_naming_the_field(spec, message):
    with pytest.raises(ValueError) as e:
        Sequential.from_spec(spec, input_shape=(6,))
    assert message in str(e.value)


def test_a_sparse_layer_needs_flat_ids():
    with pytest.raises(ValueError, match=r"layer 0: embedding expects ids of shape \(slots,\), got \(2, 3\)"):
        Sequential.from_spec([{"type": "embedding", "width": 4}], input_shape=(2, 3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_rows_sums_by_row_like_np_add_at_and_skips_minus_one(dtype):
    rng = np.random.default_rng(4)
    index = rng.integers(-1, 7, 500)
    index[index == 5] = 6  # row 5 gets nothing: zeros
    values = rng.normal(size=(500, 3)).astype(dtype)
    expected = np.zeros((7, 3), np.float64)
    np.add.at(expected, index[index != -1], values[index != -1].astype(np.float64))
    out = kernels.scatter_add_rows(np, index, values, 7)
    assert out.shape == (7, 3) and out.dtype == dtype
    np.testing.assert_allclose(out, expected, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-6)
    assert not out[5].any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_kernels_and_gradients_on_cupy_match_numpy(cp, dtype):
    rng = np.random.default_rng(5)
    x = rng.integers(-1, 200, (64, 10))
    model = Sequential.from_spec([{"type": "embedding", "width": 5, "combine": "mean"},
                                  {"type": "dense", "units": 3}], input_shape=(10,), loss="softmax_cross_entropy")
    ids, local_x = model.gather(np, x)
    ids_gpu, local_gpu = model.gather(cp, x)
    assert isinstance(ids_gpu, np.ndarray)
    np.testing.assert_array_equal(ids_gpu, ids)
    np.testing.assert_array_equal(to_numpy(local_gpu), local_x)
    params = {k: rng.normal(0, 0.5, s).astype(dtype) for k, s in model.param_shapes().items()}
    params["0.embedding.rows"] = rng.normal(0, 0.5, (len(ids), 5)).astype(dtype)
    y = rng.integers(0, 3, len(x))
    loss, grads, correct = model.loss_and_grads(np, params, local_x, y, "softmax_cross_entropy")
    loss_gpu, grads_gpu, correct_gpu = model.loss_and_grads(
        cp, {k: cp.asarray(v) for k, v in params.items()}, local_gpu, cp.asarray(y), "softmax_cross_entropy")
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}
    assert loss_gpu == pytest.approx(loss, rel=tol["rtol"]) and correct_gpu == correct
    for name in grads:
        assert grads_gpu[name].dtype == dtype
        np.testing.assert_allclose(to_numpy(grads_gpu[name]), grads[name], **tol, err_msg=name)
    index = rng.integers(-1, 9, 1000)
    values = rng.normal(size=(1000, 4)).astype(dtype)
    np.testing.assert_allclose(to_numpy(kernels.scatter_add_rows(cp, cp.asarray(index), cp.asarray(values), 9)),
                               kernels.scatter_add_rows(np, index, values, 9), **tol)
