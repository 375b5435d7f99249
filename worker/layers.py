"""Layers as pure functions of (xp, params, inputs): forward returns (output, cache), backward
returns (grad wrt the input, grads wrt the layer's parameters).

Shapes exclude the batch axis; images are NCHW. Parameter names are local to a layer ("w",
"b"); the model prefixes them. Errors carry no layer index: the model adds it.

A layer that reads ids (``reads_ids``: embedding, sparse_linear) looks rows up in a sparse table
(``tables``). The worker pulls only the rows its batch needs, so such a layer gets those rows
(u, width) in ``params`` under the table's name and, as input, each id's position among them (-1
for an empty slot); its backward returns the gradient wrt those rows under the same name.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ps.worker import kernels
from ps.worker.kernels import col2im, conv_output_hw, im2col


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _positive_int_or_pair(name: str, field: str, v) -> tuple[int, int]:
    if _is_int(v) and v > 0:
        return int(v), int(v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(e) and e > 0 for e in v):
        return int(v[0]), int(v[1])
    raise ValueError(f"{name} field '{field}': expected a positive int or a pair of them, got {v!r}")


def _fmt(shape) -> str:
    return str(tuple(shape))


@dataclass(frozen=True)
class Table:
    """A sparse table a layer reads: rows of ``width`` values keyed by id, each starting as ``init``
    ("zeros", or "normal" with mean 0 and standard deviation ``std``)."""

    width: int
    init: str = "zeros"
    std: float = 0.0


class Layer:
    """Base: a parameter-free layer that passes its input through unchanged."""

    type = ""
    fields: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    reads_ids = False  # input is ids (as positions of pulled rows), not features: only a first layer can be

    @classmethod
    def from_config(cls, cfg: dict) -> "Layer":
        """Build from a spec entry (its 'type' already checked); ValueError names a bad or missing field."""
        for k in cfg:
            if k != "type" and k not in cls.fields:
                expected = ", ".join(cls.fields) if cls.fields else "no fields besides 'type'"
                raise ValueError(f"{cls.type} has no field '{k}': expected {expected}")
        for k in cls.required:
            if k not in cfg:
                raise ValueError(f"{cls.type} needs field '{k}'")
        return cls(**{k: v for k, v in cfg.items() if k != "type"})

    def param_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of this layer's parameters, by local name, for inputs of ``input_shape``."""
        return {}

    def initializers(self) -> dict[str, str]:
        """The ps.initializers kind of each parameter."""
        return {}

    def tables(self) -> dict[str, Table]:
        """This layer's sparse tables by local name: their pulled rows come in ``params`` and their
        gradients go out of ``backward`` like parameters', but they are not in ``param_shapes``."""
        return {}

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Output shape (no batch axis); ValueError when ``input_shape`` does not fit the layer."""
        return tuple(input_shape)

    def forward(self, xp, params: dict, x, train: bool, rng):
        """(output, cache) for a batch ``x``; ``rng`` (an ``xp`` generator) is used only in training."""
        return x, None

    def backward(self, xp, params: dict, cache, grad_y, need_input_grad: bool = True):
        """(grad wrt the input, or None when not ``need_input_grad``; grads wrt parameters by local name)."""
        return grad_y, {}


class Activation(Layer):
    """An elementwise activation; backward needs only its output."""

    act = "identity"
    alpha = 0.0

    def forward(self, xp, params, x, train, rng):
        y = kernels.bias_act_forward(xp, x, None, self.act, self.alpha)
        return y, y

    def backward(self, xp, params, cache, grad_y, need_input_grad=True):
        dz, _ = kernels.bias_act_backward(xp, grad_y, cache, self.act, self.alpha, bias=False)
        return dz, {}


class ReLU(Activation):
    """max(x, 0)."""

    type, act = "relu", "relu"


class Sigmoid(Activation):
    """1 / (1 + exp(-x)), computed without overflow."""

    type, act = "sigmoid", "sigmoid"


class Tanh(Activation):
    """tanh(x)."""

    type, act = "tanh", "tanh"


class LeakyReLU(Activation):
    """x for x > 0, alpha * x otherwise (alpha >= 0)."""

    type, act = "leaky_relu", "leaky_relu"
    fields = ("alpha",)

    def __init__(self, alpha: float = 0.01):
        if not _is_number(alpha) or not 0 <= alpha < 1:
            raise ValueError(f"leaky_relu field 'alpha': expected a number in [0, 1), got {alpha!r}")
        self.alpha = float(alpha)


DENSE_ACTIVATIONS = (None, "identity", "relu", "leaky_relu", "sigmoid", "tanh")


class Dense(Layer):
    """y = act(x @ w + b), w of shape (in, units); bias and activation are one fused kernel."""

    type = "dense"
    fields = ("units", "activation", "alpha")
    required = ("units",)

    def __init__(self, units: int, activation: str | None = None, alpha: float = 0.01):
        if not _is_int(units) or units <= 0:
            raise ValueError(f"dense field 'units': expected a positive int, got {units!r}")
        if activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"dense field 'activation': unknown activation {activation!r}: expected one of "
                             f"{', '.join(a for a in DENSE_ACTIVATIONS if a)} or null")
        if not _is_number(alpha) or not 0 <= alpha < 1:
            raise ValueError(f"dense field 'alpha': expected a number in [0, 1), got {alpha!r}")
        self.units, self.act, self.alpha = int(units), activation or "identity", float(alpha)

    def _check(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"dense expects a flat input (features,), got {_fmt(input_shape)}: "
                             f"add {{'type': 'flatten'}} before it")

    def param_shapes(self, input_shape):
        self._check(input_shape)
        return {"w": (int(input_shape[0]), self.units), "b": (self.units,)}

    def initializers(self):
        return {"w": "glorot_uniform", "b": "zeros"}

    def output_shape(self, input_shape):
        self._check(input_shape)
        return (self.units,)

    def forward(self, xp, params, x, train, rng):
        y = kernels.bias_act_forward(xp, x @ params["w"], params["b"], self.act, self.alpha)
        return y, (x, y)

    def backward(self, xp, params, cache, grad_y, need_input_grad=True):
        x, y = cache
        dz, db = kernels.bias_act_backward(xp, grad_y, y, self.act, self.alpha)
        grads = {"w": x.T @ dz, "b": db}
        return (dz @ params["w"].T if need_input_grad else None), grads


class Dropout(Layer):
    """Inverted dropout: in training zero each element with probability ``rate`` and scale the
    rest by 1 / (1 - rate); identity at evaluation."""

    type = "dropout"
    random = True
    fields = ("rate",)
    required = ("rate",)

    def __init__(self, rate: float):
        if not _is_number(rate) or not 0 <= rate < 1:
            raise ValueError(f"dropout field 'rate': expected a number in [0, 1), got {rate!r}")
        self.rate = float(rate)

    def forward(self, xp, params, x, train, rng):
        if not train or self.rate == 0:
            return x, None
        keep = rng.random(x.shape, dtype=x.dtype) >= self.rate
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.rate))
        return x * mask, mask

    def backward(self, xp, params, cache, grad_y, need_input_grad=True):
        return (grad_y if cache is None else grad_y * cache), {}


class Flatten(Layer):
    """(C, H, W) or any shape -> (C*H*W,)."""

    type = "flatten"

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def forward(self, xp, params, x, train, rng):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, xp, params, cache, grad_y, need_input_grad=True):
        return grad_y.reshape(cache), {}


def _check_image(kind: str, input_shape) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{kind} expects an input of shape (channels, height, width), got {_fmt(input_shape)}"
                         + (": reshape the data to images (data.reshape)" if len(input_shape) == 1 else ""))
    return tuple(int(d) for d in input_shape)


class Conv2D(Layer):
    """2-D convolution over NCHW images, w of shape (filters, in_channels, kh, kw): im2col and one matmul.

    padding: "valid" (none), "same" (output size ceil(input / stride); needs an odd kernel) or
    an int / (vertical, horizontal) pair of zeros added on each side.
    """

    type = "conv2d"
    fields = ("filters", "kernel", "stride", "padding")
    required = ("filters", "kernel")

    def __init__(self, filters: int, kernel, stride=1, padding="valid"):
        if not _is_int(filters) or filters <= 0:
            raise ValueError(f"conv2d field 'filters': expected a positive int, got {filters!r}")
        self.filters = int(filters)
        self.kh, self.kw = _positive_int_or_pair("conv2d", "kernel", kernel)
        self.stride = _positive_int_or_pair("conv2d", "stride", stride)
        if padding == "valid":
            self.pad = (0, 0)
        elif padding == "same":
            if self.kh % 2 == 0 or self.kw % 2 == 0:
                raise ValueError(f"conv2d field 'padding': 'same' needs an odd kernel, got {self.kh}x{self.kw}")
            self.pad = ((self.kh - 1) // 2, (self.kw - 1) // 2)
        elif _is_int(padding) and padding >= 0:
            self.pad = (int(padding), int(padding))
        elif isinstance(padding, (list, tuple)) and len(padding) == 2 and all(_is_int(p) and p >= 0 for p in padding):
            self.pad = (int(padding[0]), int(padding[1]))
        else:
            raise ValueError(f"conv2d field 'padding': expected 'same', 'valid', a non-negative int or a pair "
                             f"of them, got {padding!r}")

    def output_shape(self, input_shape):
        c, h, w = _check_image("conv2d", input_shape)
        (ph, pw) = self.pad
        if h + 2 * ph < self.kh or w + 2 * pw < self.kw:
            raise ValueError(f"conv2d kernel {self.kh}x{self.kw} does not fit input {_fmt(input_shape)} with "
                             f"padding {ph}x{pw}: expected height >= {self.kh - 2 * ph} and width >= "
                             f"{self.kw - 2 * pw}")
        return (self.filters, *conv_output_hw(h, w, self.kh, self.kw, self.stride, self.pad))

    def param_shapes(self, input_shape):
        self.output_shape(input_shape)
        return {"w": (self.filters, int(input_shape[0]), self.kh, self.kw), "b": (self.filters,)}

    def initializers(self):
        return {"w": "he_normal", "b": "zeros"}

    def forward(self, xp, params, x, train, rng):
        n, _, h, w = x.shape
        oh, ow = conv_output_hw(h, w, self.kh, self.kw, self.stride, self.pad)
        cols = im2col(xp, x, self.kh, self.kw, self.stride, self.pad)
        y = cols @ params["w"].reshape(self.filters, -1).T          # (N*OH*OW, F)
        y = kernels.bias_act_forward(xp, y, params["b"], "identity")
        y = xp.ascontiguousarray(y.reshape(n, oh, ow, self.filters).transpose(0, 3, 1, 2))
        return y, (cols, x.shape)

    def backward(self, xp, params, cache, grad_y, need_input_grad=True):
        cols, x_shape = cache
        g = grad_y.transpose(0, 2, 3, 1).reshape(-1, self.filters)  # (N*OH*OW, F)
        w2 = params["w"].reshape(self.filters, -1)
        grads = {"w": (g.T @ cols).reshape(params["w"].shape), "b": g.sum(axis=0)}
        if not need_input_grad:
            return None, grads
        return col2im(xp, g @ w2, x_shape, self.kh, self.kw, self.stride, self.pad), grads


class _Pool2D(Layer):
    fields = ("size", "stride")
    required = ("size",)

    def __init__(self, size, stride=None):
        self.kh, self.kw = _positive_int_or_pair(self.type, "size", size)
        self.stride = (self.kh, self.kw) if stride is None else _positive_int_or_pair(self.type, "stride", stride)

    def output_shape(self, input_shape):
        c, h, w = _check_image(self.type, input_shape)
        if h < self.kh or w < self.kw:
            raise ValueError(f"{self.type} window {self.kh}x{self.kw} does not fit input {_fmt(input_shape)}: "
                             f"expected height >= {self.kh} and width >= {self.kw}")
        return (c, *conv_output_hw(h, w, self.kh, self.kw, self.stride, 0))

    def _windows(self, xp, x):
        # im2col rows are (n, oh, ow) and columns (c, ki, kj): one window per row of the reshape.
        n, c, h, w = x.shape
        oh, ow = conv_output_hw(h, w, self.kh, self.kw, self.stride, 0)
        cols = im2col(xp, x, self.kh, self.kw, self.stride, 0)
        return cols.reshape(-1, self.kh * self.kw), (n, oh, ow, c)

    def _unwindows(self, xp, dwin, x_shape):
        return col2im(xp, dwin.reshape(-1, x_shape[1] * self.kh * self.kw), x_shape, self.kh, self.kw,
                      self.stride, 0)


def _to_nchw(xp, flat, nohwc):
    return xp.ascontiguousarray(flat.reshape(nohwc).transpose(0, 3, 1, 2))


def _from_nchw(grad_y):
    return grad_y.transpose(0, 2, 3, 1).reshape(-1)


class MaxPool2D(_Pool2D):
    """Max over (size) windows moved by stride (default: size), no padding; the gradient goes to
    the first maximum of each window."""

    type = "maxpool2d"

    def forward(self, xp, params, x, train, rng):
        win, nohwc = self._windows(xp, x)
        arg = win.argmax(axis=1)
        rows = xp.arange(win.shape[0])
        return _to_nchw(xp, win[rows, arg], nohwc), (arg, x.shape)

    def backward(self, xp, params, cache, grad_y, need_input_grad=True):
        arg, x_shape = cache
        dwin = xp.zeros((arg.shape[0], self.kh * self.kw), grad_y.dtype)
        dwin[xp.arange(arg.shape[0]), arg] = _from_nchw(grad_y)
        return self._unwindows(xp, dwin, x_shape), {}


class AvgPool2D(_Pool2D):
    """Mean over (size) windows moved by stride (default: size), no padding."""

    type = "avgpool2d"

    def forward(self, xp, params, x, train, rng):
        win, nohwc = self._windows(xp, x)
        return _to_nchw(xp, win.mean(axis=1), nohwc), x.shape

    def backward(self, xp, params, cache, grad_y, need_input_grad=True):
        x_shape = cache
        g = _from_nchw(grad_y) * grad_y.dtype.type(1.0 / (self.kh * self.kw))
        dwin = xp.broadcast_to(g[:, None], (g.shape[0], self.kh * self.kw))
        return self._unwindows(xp, dwin, x_shape), {}


def _check_ids(kind: str, input_shape) -> int:
    if len(input_shape) != 1:
        raise ValueError(f"{kind} expects ids of shape (slots,), got {_fmt(input_shape)}")
    return int(input_shape[0])


def _bag_forward(xp, rows, local, mean: bool):
    """Per example, the sum (or with ``mean`` the average) of the rows at its positions ``local`` (n, L),
    -1 adding nothing; an example with no ids gives zeros. Returns (output (n, width), cache)."""
    y = kernels.take_rows(xp, rows, local).sum(axis=1)
    scale = None
    if mean:
        counts = (local != -1).sum(axis=1)
        scale = (1 / xp.maximum(counts, 1)).astype(rows.dtype)
        y *= scale[:, None]
    return y, (local, rows.shape[0], scale)


def _bag_backward(xp, cache, grad_y):
    """The gradient wrt the rows of ``_bag_forward``: each example's output gradient (scaled for a
    mean) added to the row of each of its ids, once per occurrence."""
    local, n_rows, scale = cache
    if scale is not None:
        grad_y = grad_y * scale[:, None]
    n, slots = local.shape
    per_slot = xp.broadcast_to(grad_y[:, None, :], (n, slots, grad_y.shape[1]))
    return kernels.scatter_add_rows(xp, local.reshape(-1), per_slot.reshape(n * slots, -1), n_rows)


EMBEDDING_COMBINES = ("concat", "sum", "mean")


class Embedding(Layer):
    """Rows of a sparse table of ``width`` looked up by id; input (slots,) ids, -1 for an empty slot.

    combine: "concat" puts the slots' rows side by side, (slots * width,), zeros for an empty slot;
    "sum" adds them and "mean" averages them over the example's ids, (width,), zeros for an example
    with none. A repeated id counts each time. Rows start normal(0, init_std).
    """

    type = "embedding"
    fields = ("width", "combine", "init_std")
    required = ("width",)
    reads_ids = True

    def __init__(self, width: int, combine: str = "mean", init_std: float = 0.01):
        if not _is_int(width) or width <= 0:
            raise ValueError(f"embedding field 'width': expected a positive int, got {width!r}")
        if combine not in EMBEDDING_COMBINES:
            raise ValueError(f"embedding field 'combine': expected one of {', '.join(EMBEDDING_COMBINES)}, "
                             f"got {combine!r}")
        if not _is_number(init_std) or not 0 <= init_std < math.inf:
            raise ValueError(f"embedding field 'init_std': expected a finite number >= 0, got {init_std!r}")
        self.width, self.combine, self.init_std = int(width), combine, float(init_std)

    def tables(self):
        # std 0 as "zeros": a ps.v1.Initializer's std of 0 reads as the default, 1.
        return {"rows": Table(self.width, "normal", self.init_std) if self.init_std else Table(self.width)}

    def output_shape(self, input_shape):
        slots = _check_ids("embedding", input_shape)
        return (slots * self.width,) if self.combine == "concat" else (self.width,)

    def forward(self, xp, params, x, train, rng):
        rows = params["rows"]
        if self.combine == "concat":
            return kernels.take_rows(xp, rows, x).reshape(x.shape[0], -1), (x, rows.shape[0])
        return _bag_forward(xp, rows, x, mean=self.combine == "mean")

    def backward(self, xp, params, cache, grad_y, need_input_grad=True):
        if self.combine != "concat":
            return None, {"rows": _bag_backward(xp, cache, grad_y)}
        local, n_rows = cache
        per_slot = grad_y.reshape(local.size, self.width)
        return None, {"rows": kernels.scatter_add_rows(xp, local.reshape(-1), per_slot, n_rows)}


class SparseLinear(Layer):
    """Linear (logistic, softmax) regression over hashed features: (units,) = the sum of the rows of
    the example's ids (input (slots,), -1 for an empty slot, a repeated id counting each time) + b.
    The table's rows (width ``units``) and b start at zeros."""

    type = "sparse_linear"
    fields = ("units",)
    required = ("units",)
    reads_ids = True

    def __init__(self, units: int):
        if not _is_int(units) or units <= 0:
            raise ValueError(f"sparse_linear field 'units': expected a positive int, got {units!r}")
        self.units = int(units)

    def tables(self):
        return {"rows": Table(self.units)}

    def param_shapes(self, input_shape):
        _check_ids("sparse_linear", input_shape)
        return {"b": (self.units,)}

    def initializers(self):
        return {"b": "zeros"}

    def output_shape(self, input_shape):
        _check_ids("sparse_linear", input_shape)
        return (self.units,)

    def forward(self, xp, params, x, train, rng):
        y, cache = _bag_forward(xp, params["rows"], x, mean=False)
        return y + params["b"], cache

    def backward(self, xp, params, cache, grad_y, need_input_grad=True):
        return None, {"rows": _bag_backward(xp, cache, grad_y), "b": grad_y.sum(axis=0)}


LAYERS: dict[str, type[Layer]] = {cls.type: cls for cls in (
    Dense, ReLU, LeakyReLU, Sigmoid, Tanh, Dropout, Conv2D, MaxPool2D, AvgPool2D, Flatten, Embedding, SparseLinear)}
