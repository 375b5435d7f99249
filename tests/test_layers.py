"""Layers, losses and Sequential models: finite-difference gradients in float64, spec errors,
and a small model that actually learns."""

from __future__ import annotations

import numpy as np
import pytest

from ps.worker import kernels
from ps.worker.layers import (AvgPool2D, Conv2D, Dense, Dropout, Flatten, LeakyReLU, MaxPool2D, ReLU, Sigmoid,
                              Tanh)
from ps.worker.losses import LOSSES, binary_cross_entropy, get_loss, mse, softmax_cross_entropy
from ps.worker.model import Sequential, validate_loss_for_output
from ps.worker.xp import asarray, get_xp, make_rng, pinned_to_host, to_numpy

from conftest import numeric_grad, rel_error

EPS = 1e-6
TOL = 1e-6


def check_layer(layer, input_shape, batch=2, seed=0):
    """Compare a layer's backward with finite differences of sum(forward * G), for inputs and parameters."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(0, 0.5, s) for k, s in layer.param_shapes(input_shape).items()}
    x = rng.normal(0, 1, (batch, *input_shape))
    out_shape = layer.output_shape(input_shape)
    g_out = rng.normal(0, 1, (batch, *out_shape))

    def f():  # the same dropout mask on every call: a fresh generator with one seed
        return float((layer.forward(np, params, x, True, make_rng(np, 7))[0] * g_out).sum())

    y, cache = layer.forward(np, params, x, True, make_rng(np, 7))
    assert y.shape == (batch, *out_shape)
    gx, grads = layer.backward(np, params, cache, g_out)
    assert gx.shape == x.shape
    assert rel_error(gx, numeric_grad(f, x)) < TOL, "grad wrt input"
    assert set(grads) == set(params)
    for k in params:
        assert grads[k].shape == params[k].shape
        assert rel_error(grads[k], numeric_grad(f, params[k])) < TOL, f"grad wrt {k}"


LAYER_CASES = [
    (Dense(5), (4,)),
    (Dense(5, "relu"), (4,)),
    (Dense(3, "leaky_relu", alpha=0.2), (6,)),
    (Dense(3, "sigmoid"), (4,)),
    (Dense(3, "tanh"), (4,)),
    (Dense(2, "identity"), (3,)),
    (ReLU(), (3, 4)),
    (LeakyReLU(0.1), (2, 3, 4)),
    (Sigmoid(), (5,)),
    (Tanh(), (2, 3, 3)),
    (Dropout(0.4), (4, 5)),
    (Flatten(), (2, 3, 4)),
    (Conv2D(3, 3, padding="same"), (2, 5, 5)),
    (Conv2D(4, 3, stride=2, padding=1), (2, 7, 6)),
    (Conv2D(2, (2, 3), stride=(2, 1)), (3, 6, 5)),
    (Conv2D(2, 3, stride=2, padding="same"), (1, 6, 7)),
    (Conv2D(2, 1), (3, 4, 4)),
    (MaxPool2D(2), (2, 4, 6)),
    (MaxPool2D(2), (2, 5, 5)),
    (MaxPool2D(3, stride=2), (2, 7, 7)),
    (MaxPool2D((2, 3), stride=1), (1, 4, 5)),
    (AvgPool2D(2), (2, 4, 4)),
    (AvgPool2D(3, stride=1), (2, 5, 4)),
]


@pytest.mark.parametrize("layer,input_shape", LAYER_CASES,
                         ids=[f"{layer.type}-{i}" for i, (layer, _) in enumerate(LAYER_CASES)])
def test_layer_gradients_match_finite_differences(layer, input_shape):
    check_layer(layer, input_shape)


def test_dropout_zeroes_about_rate_of_inputs_scales_the_rest_and_is_identity_at_eval():
    x = np.ones((200, 50), np.float32)
    layer = Dropout(0.3)
    y, mask = layer.forward(np, {}, x, True, make_rng(np, 1))
    assert y.dtype == np.float32
    assert abs((y == 0).mean() - 0.3) < 0.02
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
    again, _ = layer.forward(np, {}, x, True, make_rng(np, 1))
    np.testing.assert_array_equal(y, again)
    other, _ = layer.forward(np, {}, x, True, make_rng(np, 2))
    assert not np.array_equal(y, other)
    assert layer.forward(np, {}, x, False, None)[0] is x


def naive_conv(x, w, b, stride, pad):
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh, ow = (h + 2 * pad[0] - kh) // stride[0] + 1, (wd + 2 * pad[1] - kw) // stride[1] + 1
    out = np.zeros((n, f, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw]
            out[:, :, i, j] = np.einsum("nchw,fchw->nf", patch, w) + b
    return out


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, "same"), (3, 2, 1), ((2, 3), (1, 2), "valid"), (5, 2, 2)])
def test_conv2d_forward_matches_a_direct_convolution(kernel, stride, padding):
    rng = np.random.default_rng(3)
    layer = Conv2D(4, kernel, stride=stride, padding=padding)
    x = rng.normal(size=(3, 2, 9, 8))
    params = {k: rng.normal(size=s) for k, s in layer.param_shapes((2, 9, 8)).items()}
    y, _ = layer.forward(np, params, x, False, None)
    np.testing.assert_allclose(y, naive_conv(x, params["w"], params["b"], layer.stride, layer.pad), rtol=1e-10,
                               atol=1e-10)
    assert y.shape[1:] == layer.output_shape((2, 9, 8))


def test_col2im_is_the_adjoint_of_im2col():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 7, 6))
    cols = kernels.im2col(np, x, 3, 2, (2, 1), (1, 2))
    c = rng.normal(size=cols.shape)
    back = kernels.col2im(np, c, x.shape, 3, 2, (2, 1), (1, 2))
    assert back.shape == x.shape
    assert np.isclose((cols * c).sum(), (x * back).sum())


def test_maxpool_and_avgpool_forward_values():
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(MaxPool2D(2).forward(np, {}, x, False, None)[0],
                                  [[[[5, 7], [13, 15]]]])
    np.testing.assert_array_equal(AvgPool2D(2).forward(np, {}, x, False, None)[0],
                                  [[[[2.5, 4.5], [10.5, 12.5]]]])


@pytest.mark.parametrize("act", kernels.ACTIVATIONS)
def test_bias_act_kernel_matches_the_formula(act):
    rng = np.random.default_rng(5)
    z, b = rng.normal(0, 3, (7, 4)), rng.normal(size=4)
    v = z + b
    expected = {"identity": v, "relu": np.maximum(v, 0), "leaky_relu": np.where(v > 0, v, 0.05 * v),
                "sigmoid": 1 / (1 + np.exp(-v)), "tanh": np.tanh(v)}[act]
    np.testing.assert_allclose(kernels.bias_act_forward(np, z, b, act, alpha=0.05), expected, rtol=1e-12)


def test_sigmoid_does_not_overflow_on_large_inputs():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = kernels.bias_act_forward(np, np.array([[-1000.0, 1000.0, 0.0]]), None, "sigmoid")
    np.testing.assert_array_equal(y, [[0.0, 1.0, 0.5]])


# ---------------------------------------------------------------- losses

def check_loss(fn, output, target):
    loss, grad, _ = fn(np, output, target)
    assert isinstance(loss, float)
    assert grad.shape == output.shape
    numeric = numeric_grad(lambda: fn(np, output, target)[0], output)
    assert rel_error(grad, numeric) < TOL


def test_softmax_cross_entropy_value_gradient_and_correct_count():
    rng = np.random.default_rng(6)
    logits, labels = rng.normal(0, 2, (8, 5)), rng.integers(0, 5, 8)
    loss, _, n_correct = softmax_cross_entropy(np, logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(8), labels]).mean(), rel=1e-12)
    assert n_correct == int((logits.argmax(1) == labels).sum())
    check_loss(softmax_cross_entropy, logits, labels)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grad, n_correct = softmax_cross_entropy(np, logits, np.array([0, 0]))
    assert loss == pytest.approx(5e3)
    assert np.isfinite(grad).all() and n_correct == 1


def test_softmax_cross_entropy_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"label 3 is outside \[0, 3\)"):
        softmax_cross_entropy(np, np.zeros((2, 3)), np.array([0, 3]))


@pytest.mark.parametrize("shape", [(9, 1), (9,)])
def test_binary_cross_entropy_value_gradient_and_correct_count(shape):
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, shape)
    targets = rng.integers(0, 2, 9).astype(np.float64)
    loss, _, n_correct = binary_cross_entropy(np, logits, targets)
    p = 1 / (1 + np.exp(-logits.reshape(-1)))
    assert loss == pytest.approx(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(), rel=1e-12)
    assert n_correct == int(((p > 0.5) == (targets == 1)).sum())
    check_loss(binary_cross_entropy, logits, targets)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        big, grad, _ = binary_cross_entropy(np, np.array([[800.0], [-800.0]]), np.array([0.0, 1.0]))
    assert big == pytest.approx(800.0) and np.isfinite(grad).all()


@pytest.mark.parametrize("out_shape,target_shape", [((6, 1), (6,)), ((6, 3), (6, 3))])
def test_mse_value_and_gradient(out_shape, target_shape):
    rng = np.random.default_rng(8)
    out, target = rng.normal(size=out_shape), rng.normal(size=target_shape)
    loss, _, n_correct = mse(np, out, target)
    assert loss == pytest.approx(((out - target.reshape(out_shape)) ** 2).mean(), rel=1e-12)
    assert n_correct is None
    check_loss(mse, out, target)


def test_losses_are_registered_by_name_and_unknown_names_are_rejected():
    assert set(LOSSES) == {"softmax_cross_entropy", "binary_cross_entropy", "mse"}
    with pytest.raises(ValueError, match="unknown loss 'hinge': expected one of softmax_cross_entropy"):
        get_loss("hinge")


@pytest.mark.parametrize("loss,shape,message", [
    ("binary_cross_entropy", (10,), "binary_cross_entropy needs 1 output, the model's output shape is (10,)"),
    ("softmax_cross_entropy", (1,), "softmax_cross_entropy needs a flat output of at least 2 classes"),
    ("hinge", (1,), "unknown loss 'hinge'"),
])
def test_loss_must_fit_the_models_output(loss, shape, message):
    with pytest.raises(ValueError) as err:
        validate_loss_for_output(loss, shape)
    assert message in str(err.value)
    validate_loss_for_output("mse", (10,))
    validate_loss_for_output("binary_cross_entropy", (1,))


# ---------------------------------------------------------------- Sequential

MLP = [{"type": "dense", "units": 6, "activation": "tanh"}, {"type": "dropout", "rate": 0.25},
       {"type": "dense", "units": 5, "activation": "leaky_relu"}, {"type": "sigmoid"},
       {"type": "dense", "units": 3}]
CNN = [{"type": "conv2d", "filters": 3, "kernel": 3, "stride": 2, "padding": 1}, {"type": "relu"},
       {"type": "conv2d", "filters": 2, "kernel": 3, "padding": "same"}, {"type": "tanh"},
       {"type": "maxpool2d", "size": 2}, {"type": "avgpool2d", "size": 1},
       {"type": "flatten"}, {"type": "dense", "units": 4, "activation": "relu"}, {"type": "dense", "units": 3}]


@pytest.mark.parametrize("spec,input_shape,loss,target", [
    (MLP, (4,), "softmax_cross_entropy", lambda r, n: r.integers(0, 3, n)),
    (CNN, (2, 8, 7), "softmax_cross_entropy", lambda r, n: r.integers(0, 3, n)),
    (MLP[:-1] + [{"type": "dense", "units": 1}], (4,), "binary_cross_entropy",
     lambda r, n: r.integers(0, 2, n).astype(float)),
    (MLP, (4,), "mse", lambda r, n: r.normal(size=(n, 3))),
], ids=["mlp-softmax", "cnn-softmax", "mlp-bce", "mlp-mse"])
def test_sequential_gradients_match_finite_differences(spec, input_shape, loss, target):
    model = Sequential.from_spec(spec, input_shape=input_shape)
    rng = np.random.default_rng(9)
    params = {k: v + rng.normal(0, 0.1, v.shape) for k, v in model.init_params(1, dtype=np.float64).items()}
    x = rng.normal(size=(5, *input_shape))
    y = target(rng, 5)
    loss_value, grads, _ = model.loss_and_grads(np, params, x, y, loss, train=True, rng_seed=3)
    assert list(grads) == list(model.param_shapes())

    def f():
        return model.loss_and_grads(np, params, x, y, loss, train=True, rng_seed=3)[0]
    assert f() == loss_value
    for name, p in params.items():
        assert grads[name].dtype == np.float64
        assert rel_error(grads[name], numeric_grad(f, p)) < TOL, name


def test_parameter_names_are_indexed_typed_and_ordered():
    model = Sequential.from_spec(CNN, input_shape=(2, 8, 7))
    assert model.param_shapes() == {"0.conv2d.w": (3, 2, 3, 3), "0.conv2d.b": (3,), "2.conv2d.w": (2, 3, 3, 3),
                                    "2.conv2d.b": (2,), "7.dense.w": (8, 4), "7.dense.b": (4,),
                                    "8.dense.w": (4, 3), "8.dense.b": (3,)}
    assert model.output_shape == (3,)


def test_init_params_are_seeded_glorot_and_he_with_zero_biases():
    model = Sequential.from_spec(CNN, input_shape=(2, 8, 7))
    a, b, c = model.init_params(0), model.init_params(0), model.init_params(1)
    for k in a:
        assert a[k].dtype == np.float32 and a[k].shape == model.param_shapes()[k]
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["7.dense.w"], c["7.dense.w"])
    assert not a["7.dense.b"].any() and not a["0.conv2d.b"].any()
    assert np.abs(a["7.dense.w"]).max() <= np.sqrt(6 / (8 + 4))
    assert model.init_params(0, dtype=np.float64)["8.dense.w"].dtype == np.float64


def test_to_spec_round_trips():
    model = Sequential.from_spec(CNN, input_shape=(2, 8, 7))
    again = Sequential.from_spec(model.to_spec(), input_shape=(2, 8, 7))
    assert again.to_spec() == CNN and again.param_shapes() == model.param_shapes()


def test_predict_returns_class_ids_bits_or_values():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(6, 4))
    soft = Sequential.from_spec(MLP, input_shape=(4,))
    p = soft.init_params(0)
    out = soft.forward(np, p, x)
    np.testing.assert_array_equal(soft.predict(np, p, x), out.argmax(1))
    np.testing.assert_array_equal(soft.predict(np, p, x, loss="mse"), out)
    one = Sequential.from_spec(MLP[:-1] + [{"type": "dense", "units": 1}], input_shape=(4,),
                               loss="binary_cross_entropy")
    q = one.init_params(0)
    np.testing.assert_array_equal(one.predict(np, q, x), (one.forward(np, q, x)[:, 0] > 0).astype(int))


def test_eval_forward_ignores_dropout():
    model = Sequential.from_spec([{"type": "dropout", "rate": 0.5}, {"type": "dense", "units": 2}], input_shape=(3,))
    p = model.init_params(0)
    x = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(model.forward(np, p, x), x @ p["1.dense.w"])


BAD_SPECS = [
    ([{"type": "dense", "units": 10}, {"type": "relu"}, {"type": "foo"}], (64,),
     "layer 2: unknown layer type 'foo': expected one of dense, relu, leaky_relu, sigmoid, tanh, dropout, "
     "conv2d, maxpool2d, avgpool2d, flatten"),
    ([{"units": 3}], (4,), "layer 0: expected a dict with a 'type' field"),
    ([{"type": "dense"}], (4,), "layer 0: dense needs field 'units'"),
    ([{"type": "relu"}, {"type": "dense", "units": -1}], (4,),
     "layer 1: dense field 'units': expected a positive int, got -1"),
    ([{"type": "dense", "units": 2.5}], (4,), "layer 0: dense field 'units': expected a positive int, got 2.5"),
    ([{"type": "dense", "units": 2, "activation": "swish"}], (4,),
     "layer 0: dense field 'activation': unknown activation 'swish'"),
    ([{"type": "dense", "units": 2, "unit": 3}], (4,), "layer 0: dense has no field 'unit': expected units"),
    ([{"type": "dropout", "rate": 1.0}], (4,), "layer 0: dropout field 'rate': expected a number in [0, 1), got 1.0"),
    ([{"type": "conv2d", "filters": 4, "kernel": 3}], (64,),
     "layer 0: conv2d expects an input of shape (channels, height, width), got (64,)"),
    ([{"type": "conv2d", "filters": 4, "kernel": 9}], (1, 8, 8),
     "layer 0: conv2d kernel 9x9 does not fit input (1, 8, 8) with padding 0x0"),
    ([{"type": "conv2d", "filters": 4, "kernel": 4, "padding": "same"}], (1, 8, 8),
     "layer 0: conv2d field 'padding': 'same' needs an odd kernel, got 4x4"),
    ([{"type": "conv2d", "filters": 4, "kernel": 3, "padding": "full"}], (1, 8, 8),
     "layer 0: conv2d field 'padding': expected 'same', 'valid', a non-negative int or a pair of them, got 'full'"),
    ([{"type": "conv2d", "filters": 4, "kernel": 3}, {"type": "dense", "units": 10}], (1, 8, 8),
     "layer 1: dense expects a flat input (features,), got (4, 6, 6): add {'type': 'flatten'} before it"),
    ([{"type": "flatten"}, {"type": "maxpool2d", "size": 2}], (1, 8, 8),
     "layer 1: maxpool2d expects an input of shape (channels, height, width), got (64,)"),
    ([{"type": "avgpool2d", "size": 3}, {"type": "maxpool2d", "size": 3}], (1, 8, 8),
     "layer 1: maxpool2d window 3x3 does not fit input (1, 2, 2)"),
    ([{"type": "leaky_relu", "alpha": -0.1}], (4,), "layer 0: leaky_relu field 'alpha'"),
    ([], (4,), "expected a non-empty list of layers"),
]


@pytest.mark.parametrize("spec,input_shape,message", BAD_SPECS, ids=[m.split(":")[0] + "-" + str(i)
                                                                    for i, (_, _, m) in enumerate(BAD_SPECS)])
def test_bad_specs_are_rejected_with_the_layer_index_and_the_problem(spec, input_shape, message):
    with pytest.raises(ValueError) as err:
        Sequential.from_spec(spec, input_shape=input_shape)
    assert message in str(err.value)


def test_a_loss_that_does_not_fit_the_output_is_rejected_at_build():
    with pytest.raises(ValueError, match="binary_cross_entropy needs 1 output"):
        Sequential.from_spec([{"type": "dense", "units": 3}], input_shape=(4,), loss="binary_cross_entropy")


def test_an_mlp_trained_with_plain_sgd_separates_four_blobs():
    rng = np.random.default_rng(11)
    centers = np.array([[3, 3], [-3, 3], [3, -3], [-3, -3]], np.float32)
    labels = rng.integers(0, 4, 800)
    x = (centers[labels] + rng.normal(0, 0.7, (800, 2))).astype(np.float32)
    model = Sequential.from_spec([{"type": "dense", "units": 16, "activation": "relu"},
                                  {"type": "dropout", "rate": 0.1}, {"type": "dense", "units": 4}],
                                 input_shape=(2,), loss="softmax_cross_entropy")
    params = model.init_params(0)
    first = model.loss_and_grads(np, params, x, labels, "softmax_cross_entropy", train=False)[0]
    for step in range(300):
        idx = rng.integers(0, 800, 32)
        _, grads, _ = model.loss_and_grads(np, params, x[idx], labels[idx], "softmax_cross_entropy", rng_seed=step)
        for k, g in grads.items():
            assert g.dtype == np.float32
            params[k] -= 0.1 * g
    last, _, n_correct = model.loss_and_grads(np, params, x, labels, "softmax_cross_entropy", train=False)
    assert first > 1.0
    assert last < 0.05
    assert n_correct / 800 >= 0.99
    assert (model.predict(np, params, x) == labels).mean() >= 0.99


# ---------------------------------------------------------------- xp

def test_cpu_device_is_numpy_and_unknown_devices_are_rejected():
    assert get_xp("cpu") is np
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        get_xp("tpu")
    with pytest.raises(ValueError, match="unknown device 'gpu:x'"):
        get_xp("gpu:x")


def test_gpu_device_without_cupy_names_the_device():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a CUDA GPU is present: the error path cannot be reached")
    except Exception:
        pass
    with pytest.raises(RuntimeError, match="device 'gpu:0' needs cupy and a CUDA GPU: "):
        get_xp("gpu:0")


def test_numpy_helpers_pass_arrays_through():
    a = {"w": np.arange(3.0)}
    assert pinned_to_host(np, a) is a
    assert to_numpy([1, 2]).tolist() == [1, 2]
    assert asarray(np, [1, 2], np.float32).dtype == np.float32


def test_only_a_model_with_dropout_draws_a_generator_per_step(monkeypatch):
    from ps.worker import model as model_module
    built = []
    monkeypatch.setattr(model_module, "make_rng", lambda xp, seed: built.append(seed) or make_rng(xp, seed))
    plain = Sequential.from_spec([{"type": "dense", "units": 4}], input_shape=(3,))
    drop = Sequential.from_spec([{"type": "dropout", "rate": 0.5}, {"type": "dense", "units": 4}], input_shape=(3,))
    x, y = np.ones((2, 3), np.float32), np.zeros(2, np.int64)
    plain.loss_and_grads(np, plain.init_params(0), x, y, "softmax_cross_entropy", rng_seed=7)
    assert built == [] and not plain.random
    drop.loss_and_grads(np, drop.init_params(0), x, y, "softmax_cross_entropy", rng_seed=7)
    assert built == [7] and drop.random
