"""Each fused CuPy kernel against its NumPy reference, on random inputs in float32 and float64.

Skipped, with the reason shown, where cupy or a CUDA GPU is missing (the ``cp`` fixture, conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from ps.worker import kernels
from ps.worker.model import Sequential
from ps.worker.xp import get_xp, make_rng, pinned_to_host, to_numpy

pytestmark = pytest.mark.gpu

DTYPES = [np.float32, np.float64]


def tol(dtype) -> dict:
    return {"rtol": 2e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-13}


def same(gpu, ref, dtype):
    gpu = to_numpy(gpu)
    assert gpu.dtype == np.asarray(ref).dtype, (gpu.dtype, np.asarray(ref).dtype)
    np.testing.assert_allclose(gpu, ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", kernels.ACTIVATIONS)
def test_bias_act_forward_kernel_matches_numpy(cp, act, dtype):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (67, 33)).astype(dtype)
    b = rng.normal(0, 1, 33).astype(dtype)
    same(kernels.bias_act_forward(cp, cp.asarray(z), cp.asarray(b), act, alpha=0.1),
         kernels.bias_act_forward(np, z, b, act, alpha=0.1), dtype)
    images = rng.normal(0, 3, (2, 3, 5, 4)).astype(dtype)  # no bias: any shape
    same(kernels.bias_act_forward(cp, cp.asarray(images), None, act, alpha=0.1),
         kernels.bias_act_forward(np, images, None, act, alpha=0.1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", kernels.ACTIVATIONS)
def test_bias_act_backward_kernel_matches_numpy(cp, act, dtype):
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (67, 33)).astype(dtype)
    b = rng.normal(0, 1, 33).astype(dtype)
    g = rng.normal(0, 1, (67, 33)).astype(dtype)
    out = kernels.bias_act_forward(np, z, b, act, alpha=0.1)
    dz, db = kernels.bias_act_backward(cp, cp.asarray(g), cp.asarray(out), act, alpha=0.1)
    ref_dz, ref_db = kernels.bias_act_backward(np, g, out, act, alpha=0.1)
    same(dz, ref_dz, dtype)
    np.testing.assert_allclose(to_numpy(db), ref_db, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-5)
    dz, db = kernels.bias_act_backward(cp, cp.asarray(g), cp.asarray(out), act, alpha=0.1, bias=False)
    assert db is None
    same(dz, ref_dz, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_kernel_matches_numpy(cp, dtype):
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 4, (300, 10)).astype(dtype)
    logits[0] = [1e4, 0, -1e4, 0, 0, 0, 0, 0, 0, 0]  # stability: a huge logit must not overflow
    labels = rng.integers(0, 10, 300)
    loss, d, n_correct = kernels.softmax_xent(cp, cp.asarray(logits), cp.asarray(labels))
    ref_loss, ref_d, ref_correct = kernels.softmax_xent(np, logits, labels)
    assert isinstance(loss, float) and np.isfinite(loss)
    assert loss == pytest.approx(ref_loss, rel=1e-5 if dtype == np.float32 else 1e-12)
    same(d, ref_d, dtype)
    assert n_correct == ref_correct
    # A transposed (non-contiguous) view and int32 labels give the same numbers.
    t = cp.asarray(np.ascontiguousarray(logits.T)).T
    loss2, d2, n2 = kernels.softmax_xent(cp, t, cp.asarray(labels.astype(np.int32)))
    assert loss2 == pytest.approx(loss, rel=1e-12) and n2 == n_correct
    same(d2, to_numpy(d), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [256, 1000, 5003])
def test_the_block_per_row_softmax_xent_kernel_for_wide_outputs_matches_numpy(cp, dtype, classes):
    assert classes >= kernels.WIDE_CLASSES
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 4, (70, classes)).astype(dtype)
    logits[0, 7] = logits[0, 9] = 1e4  # a tie for the max: the first index counts, as on the CPU
    labels = rng.integers(0, classes, 70)
    labels[0] = 7
    loss, d, n_correct = kernels.softmax_xent(cp, cp.asarray(logits), cp.asarray(labels))
    ref_loss, ref_d, ref_correct = kernels.softmax_xent(np, logits, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-5 if dtype == np.float32 else 1e-12)
    same(d, ref_d, dtype)
    assert n_correct == ref_correct and n_correct >= 1
    bad = labels.copy()
    bad[3] = classes  # out of range: the row's loss is NaN, nothing read out of bounds
    loss_bad, d_bad, _ = kernels.softmax_xent(cp, cp.asarray(logits), cp.asarray(bad))
    assert np.isnan(loss_bad) and np.isnan(to_numpy(d_bad)[3]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(129, 1), (129,)])
def test_bce_logits_kernel_matches_numpy(cp, shape, dtype):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, shape).astype(dtype)
    logits.reshape(-1)[:2] = [800, -800]
    targets = rng.integers(0, 2, 129).astype(dtype)
    loss, d, n_correct = kernels.bce_logits(cp, cp.asarray(logits), cp.asarray(targets))
    ref_loss, ref_d, ref_correct = kernels.bce_logits(np, logits, targets)
    assert loss == pytest.approx(ref_loss, rel=1e-5 if dtype == np.float32 else 1e-12)
    same(d, ref_d, dtype)
    assert d.shape == logits.shape
    assert n_correct == ref_correct


GEOMETRIES = [((2, 3, 8, 8), 3, 3, 1, 1), ((3, 2, 7, 6), 3, 3, 2, 1), ((2, 4, 9, 5), 2, 3, (2, 1), (0, 1)),
              ((1, 1, 5, 5), 5, 5, 1, 2), ((4, 16, 4, 4), 3, 3, 1, 1), ((2, 3, 6, 6), 2, 2, 2, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kh,kw,stride,pad", GEOMETRIES)
def test_im2col_and_col2im_kernels_match_numpy(cp, shape, kh, kw, stride, pad, dtype):
    rng = np.random.default_rng(4)
    x = rng.normal(size=shape).astype(dtype)
    cols = kernels.im2col(cp, cp.asarray(x), kh, kw, stride, pad)
    ref_cols = kernels.im2col(np, x, kh, kw, stride, pad)
    assert cols.shape == ref_cols.shape
    np.testing.assert_array_equal(to_numpy(cols), ref_cols)  # a gather: bit-identical
    c = rng.normal(size=ref_cols.shape).astype(dtype)
    same(kernels.col2im(cp, cp.asarray(c), shape, kh, kw, stride, pad),
         kernels.col2im(np, c, shape, kh, kw, stride, pad), dtype)


CNN = [{"type": "conv2d", "filters": 4, "kernel": 3, "stride": 2, "padding": 1}, {"type": "relu"},
       {"type": "conv2d", "filters": 6, "kernel": 3, "padding": "same"}, {"type": "leaky_relu"},
       {"type": "maxpool2d", "size": 2}, {"type": "avgpool2d", "size": 1}, {"type": "flatten"},
       {"type": "dense", "units": 16, "activation": "sigmoid"}, {"type": "dense", "units": 5, "activation": "tanh"},
       {"type": "dense", "units": 3}]


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_cnn_gives_the_same_loss_and_gradients_on_gpu_and_cpu(cp, dtype):
    model = Sequential.from_spec(CNN, input_shape=(2, 9, 8))
    params = model.init_params(0, dtype=dtype)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 2, 9, 8)).astype(dtype)
    y = rng.integers(0, 3, 16)
    ref_loss, ref_grads, ref_correct = model.loss_and_grads(np, params, x, y, "softmax_cross_entropy", train=False)
    dev = {k: cp.asarray(v) for k, v in params.items()}
    loss, grads, n_correct = model.loss_and_grads(cp, dev, cp.asarray(x), cp.asarray(y), "softmax_cross_entropy",
                                                  train=False)
    assert loss == pytest.approx(ref_loss, rel=1e-5 if dtype == np.float32 else 1e-10)
    assert n_correct == ref_correct
    for k, g in grads.items():
        np.testing.assert_allclose(to_numpy(g), ref_grads[k], rtol=1e-3 if dtype == np.float32 else 1e-9,
                                   atol=1e-5 if dtype == np.float32 else 1e-12, err_msg=k)
    np.testing.assert_array_equal(to_numpy(model.predict(cp, dev, cp.asarray(x))), model.predict(np, params, x))


def test_dropout_on_gpu_masks_about_rate_of_inputs_reproducibly(cp):
    model = Sequential.from_spec([{"type": "dropout", "rate": 0.3}], input_shape=(1000,))
    x = cp.ones((50, 1000), cp.float32)
    a = to_numpy(model.forward(cp, {}, x, train=True, rng_seed=1))
    b = to_numpy(model.forward(cp, {}, x, train=True, rng_seed=1))
    np.testing.assert_array_equal(a, b)
    assert abs((a == 0).mean() - 0.3) < 0.01
    assert make_rng(cp, 0) is not None


def test_gpu_device_selects_cupy_and_pinned_copies_round_trip(cp):
    assert get_xp("gpu") is cp and get_xp("gpu:0") is cp
    with pytest.raises(RuntimeError, match="device 'gpu:99' needs cupy and a CUDA GPU"):
        get_xp("gpu:99")
    first = {"0.dense.w": cp.arange(12, dtype=cp.float32).reshape(3, 4), "0.dense.b": cp.ones(4, cp.float64)}
    host = pinned_to_host(cp, first)
    assert all(isinstance(v, np.ndarray) for v in host.values())
    np.testing.assert_array_equal(host["0.dense.w"], np.arange(12, dtype=np.float32).reshape(3, 4))
    assert host["0.dense.b"].dtype == np.float64
    address = host["0.dense.w"].ctypes.data
    again = pinned_to_host(cp, {"0.dense.w": first["0.dense.w"] * 2})
    assert again["0.dense.w"].ctypes.data == address  # the pinned buffer is reused
    np.testing.assert_array_equal(again["0.dense.w"], 2 * np.arange(12, dtype=np.float32).reshape(3, 4))


def test_pinned_copies_of_two_slots_do_not_overwrite_each_other_and_weights_go_back_async(cp):
    from ps.worker.xp import empty_host
    a = {"w": cp.arange(1000, dtype=cp.float32)}
    one = pinned_to_host(cp, a, slot=0)
    two = pinned_to_host(cp, {"w": a["w"] * 3}, slot=1)
    assert one["w"].ctypes.data != two["w"].ctypes.data
    np.testing.assert_array_equal(one["w"], np.arange(1000, dtype=np.float32))  # slot 0 kept its step
    np.testing.assert_array_equal(two["w"], 3 * np.arange(1000, dtype=np.float32))
    host = empty_host(cp, (1000,), np.float32)
    assert type(empty_host(np, (3,), np.float32)) is np.ndarray
    host[:] = np.arange(1000, dtype=np.float32) * 5
    dev = cp.asarray(host)  # from page-locked memory: queued on the current stream
    np.testing.assert_array_equal(cp.asnumpy(dev), host)


def test_a_model_without_dropout_builds_no_generator_for_a_step(cp, monkeypatch):
    from ps.worker import model as model_module
    built = []
    monkeypatch.setattr(model_module, "make_rng", lambda xp, seed: built.append(seed))
    m = Sequential.from_spec([{"type": "dense", "units": 4}], input_shape=(3,))
    params = {k: cp.asarray(v) for k, v in m.init_params(0).items()}
    m.loss_and_grads(cp, params, cp.ones((2, 3), cp.float32), cp.zeros(2, cp.int64), "softmax_cross_entropy")
    assert built == []


@pytest.mark.parametrize("loss,units,labels", [("softmax_cross_entropy", 5, "classes"),
                                               ("binary_cross_entropy", 1, "binary"), ("mse", 1, "values")])
def test_a_lazy_loss_stays_on_the_device_and_comes_back_with_the_gradients_in_one_copy(cp, loss, units, labels):
    # the worker's step: its loss and correct count are not read on their own (a host sync), but
    # copied with the gradients, whose copy stream the step waits for once
    m = Sequential.from_spec([{"type": "dense", "units": 8, "activation": "relu"}, {"type": "dense", "units": units}],
                             input_shape=(6,))
    params = m.init_params(1)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = {"classes": rng.integers(0, 5, 40), "binary": rng.integers(0, 2, 40).astype(np.float32),
         "values": rng.normal(size=40).astype(np.float32)}[labels]
    dev = {k: cp.asarray(v) for k, v in params.items()}
    eager_loss, eager_grads, eager_correct = m.loss_and_grads(cp, dev, cp.asarray(x), cp.asarray(y), loss)
    pair, grads, none = m.loss_and_grads(cp, dev, cp.asarray(x), cp.asarray(y), loss, lazy=True)
    assert isinstance(pair, cp.ndarray) and pair.shape == (2,) and pair.dtype == np.float64 and none is None
    host = pinned_to_host(cp, {**grads, "\x00loss": pair})
    assert host["\x00loss"][0] == pytest.approx(eager_loss, rel=1e-6)
    if eager_correct is None:
        assert np.isnan(host["\x00loss"][1])
    else:
        assert host["\x00loss"][1] == eager_correct
    for k, g in eager_grads.items():
        np.testing.assert_array_equal(host[k], to_numpy(g), err_msg=k)
    # on NumPy, lazy changes nothing: the figures are plain numbers
    ref = m.loss_and_grads(np, params, x, y, loss, lazy=True)
    assert ref[0] == pytest.approx(eager_loss, rel=1e-5) and isinstance(ref[0], float)
