"""The worker's hot paths, each a function of the array module ``xp`` first.

On NumPy each runs its reference implementation; on CuPy a fused kernel (built lazily, so
importing this module never needs CuPy) computes the same numbers in one launch. The GPU
tests compare the two.
"""

from __future__ import annotations

import functools

import numpy as np

from ps.worker.xp import is_cupy

ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh")


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{act}': expected one of {', '.join(ACTIVATIONS)}")


def pair(v) -> tuple[int, int]:
    """An int or a pair of ints as a pair."""
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


# ---------------------------------------------------------------- bias + activation

def _act_ref(xp, z, act: str, alpha: float):
    if act == "identity":
        return z
    if act == "relu":
        return xp.maximum(z, 0)
    if act == "leaky_relu":
        return xp.where(z > 0, z, alpha * z)
    if act == "sigmoid":
        e = xp.exp(-xp.abs(z))  # never overflows: exp of a non-positive number
        return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))
    return xp.tanh(z)


def _act_grad_ref(xp, grad, out, act: str, alpha: float):
    # Every derivative is written in terms of the output, so layers keep only the output.
    # For leaky_relu that needs alpha >= 0 (then out > 0 exactly where the input is > 0).
    if act == "identity":
        return grad
    if act == "relu":
        return grad * (out > 0)
    if act == "leaky_relu":
        return xp.where(out > 0, grad, alpha * grad)
    if act == "sigmoid":
        return grad * out * (1 - out)
    return grad * (1 - out * out)


_FWD_CODE = {
    "identity": "y = v;",
    "relu": "y = v > (T)0 ? v : (T)0;",
    "leaky_relu": "y = v > (T)0 ? v : (T)(alpha * v);",
    "sigmoid": "T e = exp(v >= (T)0 ? -v : v); y = v >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);",
    "tanh": "y = tanh(v);",
}

_BWD_CODE = {
    "identity": "dz = g;",
    "relu": "dz = y > (T)0 ? g : (T)0;",
    "leaky_relu": "dz = y > (T)0 ? g : (T)(alpha * g);",
    "sigmoid": "dz = g * y * ((T)1 - y);",
    "tanh": "dz = g * ((T)1 - y * y);",
}


@functools.lru_cache(maxsize=None)
def _act_forward_kernel(act: str, with_bias: bool):
    import cupy
    if with_bias:
        # b has shape (n,) and broadcasts over the rows of z (n = last axis).
        return cupy.ElementwiseKernel("T z, T b, float64 alpha", "T y", "T v = z + b; " + _FWD_CODE[act],
                                      f"ps_bias_{act}_forward")
    return cupy.ElementwiseKernel("T z, float64 alpha", "T y", "T v = z; " + _FWD_CODE[act], f"ps_{act}_forward")


@functools.lru_cache(maxsize=None)
def _act_backward_kernel(act: str):
    import cupy
    return cupy.ElementwiseKernel("T g, T y, float64 alpha", "T dz", _BWD_CODE[act], f"ps_{act}_backward")


def bias_act_forward(xp, z, b, act: str, alpha: float = 0.01):
    """``act(z + b)`` with ``b`` (shape (n,), or None for no bias) broadcast over the last axis of ``z``."""
    _check_act(act)
    if is_cupy(xp):
        if b is None:
            return _act_forward_kernel(act, False)(z, float(alpha))
        return _act_forward_kernel(act, True)(z, b.astype(z.dtype, copy=False), float(alpha))
    v = z if b is None else z + b
    return _act_ref(xp, v, act, alpha)


def bias_act_backward(xp, grad_out, out, act: str, alpha: float = 0.01, bias: bool = True):
    """(grad wrt the pre-activation, grad wrt the bias or None) from the output ``out`` of ``bias_act_forward``.

    The bias gradient sums the pre-activation gradient over every axis but the last.
    """
    _check_act(act)
    if is_cupy(xp):
        dz = _act_backward_kernel(act)(grad_out, out, float(alpha))
    else:
        dz = _act_grad_ref(xp, grad_out, out, act, alpha)
    db = dz.reshape(-1, dz.shape[-1]).sum(axis=0) if bias else None
    return dz, db


# ---------------------------------------------------------------- softmax cross-entropy

_SOFTMAX_XENT_CODE = r"""
extern "C" __global__ void ps_softmax_xent_REAL(const REAL* logits, const long long* labels, const long long n,
                                                const long long c, const REAL inv_n, REAL* dlogits, REAL* losses,
                                                int* correct) {
    // One thread per row: max, log-sum-exp, loss, gradient and argmax in one pass over memory.
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const REAL* row = logits + i * c;
    REAL* drow = dlogits + i * c;
    REAL m = row[0];
    long long arg = 0;
    for (long long j = 1; j < c; ++j) {
        if (row[j] > m) { m = row[j]; arg = j; }
    }
    REAL s = 0;
    for (long long j = 0; j < c; ++j) s += EXP(row[j] - m);
    const long long y = labels[i];
    if (y < 0 || y >= c) {  // out-of-range label: poison the loss instead of reading out of bounds
        losses[i] = NAN_VALUE;
        correct[i] = 0;
        for (long long j = 0; j < c; ++j) drow[j] = NAN_VALUE;
        return;
    }
    losses[i] = LOG(s) + m - row[y];
    const REAL inv_s = (REAL)1 / s;
    for (long long j = 0; j < c; ++j) {
        drow[j] = (EXP(row[j] - m) * inv_s - (j == y ? (REAL)1 : (REAL)0)) * inv_n;
    }
    correct[i] = arg == y ? 1 : 0;
}
"""


@functools.lru_cache(maxsize=None)
def _softmax_xent_kernel(dtype_name: str):
    import cupy
    if dtype_name == "float32":
        real, exp, log, nan = "float", "expf", "logf", "__int_as_float(0x7fc00000)"
    else:
        real, exp, log, nan = "double", "exp", "log", "__longlong_as_double(0x7ff8000000000000LL)"
    code = (_SOFTMAX_XENT_CODE.replace("NAN_VALUE", nan).replace("REAL", real)
            .replace("EXP", exp).replace("LOG", log))
    return cupy.RawKernel(code, f"ps_softmax_xent_{real}")


def _softmax_xent_ref(xp, logits, labels):
    n = logits.shape[0]
    if n and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        bad = labels[(labels < 0) | (labels >= logits.shape[1])][0]
        raise ValueError(f"softmax_cross_entropy: label {int(bad)} is outside [0, {logits.shape[1]})")
    rows = xp.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    loss = float((xp.log(s[:, 0]) - shifted[rows, labels]).sum()) / max(n, 1)
    d = e / s
    d[rows, labels] -= 1
    d *= logits.dtype.type(1.0 / max(n, 1))
    n_correct = int((logits.argmax(axis=1) == labels).sum())
    return loss, d, n_correct


def softmax_xent(xp, logits, labels):
    """Mean softmax cross-entropy of ``logits`` (N, C) against integer ``labels`` (N,).

    Returns (mean loss as a float, dloss/dlogits (N, C), number of rows whose argmax is the label).
    """
    labels = labels.reshape(-1).astype(np.int64, copy=False)
    if not is_cupy(xp) or logits.dtype not in (np.float32, np.float64):
        return _softmax_xent_ref(xp, logits, labels)
    n, c = logits.shape
    logits = xp.ascontiguousarray(logits)
    labels = xp.ascontiguousarray(labels)
    d = xp.empty_like(logits)
    losses = xp.empty(n, logits.dtype)
    correct = xp.empty(n, np.int32)
    if n:
        threads = 128
        _softmax_xent_kernel(logits.dtype.name)(
            ((n + threads - 1) // threads,), (threads,),
            (logits, labels, np.int64(n), np.int64(c), logits.dtype.type(1.0 / n), d, losses, correct))
    return float(losses.sum()) / max(n, 1), d, int(correct.sum())


# ---------------------------------------------------------------- binary cross-entropy with logits

@functools.lru_cache(maxsize=None)
def _bce_kernel():
    import cupy
    return cupy.ElementwiseKernel(
        "T z, T t, T inv_n", "T loss, T dz, int32 ok",
        """
        // max(z, 0) - z t + log(1 + exp(-|z|)) is log(1 + exp(z)) - z t without overflow.
        const T e = exp(z >= (T)0 ? -z : z);
        loss = (z > (T)0 ? z : (T)0) - z * t + log1p(e);
        const T s = z >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
        dz = (s - t) * inv_n;
        ok = ((z > (T)0) == (t > (T)0.5)) ? 1 : 0;
        """,
        "ps_bce_logits")


def bce_logits(xp, logits, targets):
    """Mean binary cross-entropy of ``logits`` against 0/1 ``targets`` (same number of elements).

    Returns (mean loss as a float, dloss/dlogits shaped like ``logits``, number of elements
    where ``logits > 0`` agrees with ``targets > 0.5``).
    """
    targets = targets.reshape(logits.shape).astype(logits.dtype, copy=False)
    size = max(logits.size, 1)
    if is_cupy(xp) and logits.dtype in (np.float32, np.float64):
        loss, d, ok = _bce_kernel()(logits, targets, logits.dtype.type(1.0 / size))
        return float(loss.sum()) / size, d, int(ok.sum())
    e = xp.exp(-xp.abs(logits))
    loss = float((xp.maximum(logits, 0) - logits * targets + xp.log1p(e)).sum()) / size
    s = xp.where(logits >= 0, 1 / (1 + e), e / (1 + e))
    d = (s - targets) * logits.dtype.type(1.0 / size)
    n_correct = int(((logits > 0) == (targets > 0.5)).sum())
    return loss, d, n_correct


# ---------------------------------------------------------------- im2col / col2im (NCHW)

def conv_output_hw(h: int, w: int, kh: int, kw: int, stride, pad) -> tuple[int, int]:
    """Output height and width of a (kh, kw) window sliding over an (h, w) image."""
    (sh, sw), (ph, pw) = pair(stride), pair(pad)
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


_IM2COL_CODE = """
const ptrdiff_t ckk = (ptrdiff_t)C * KH * KW;
const ptrdiff_t r = i / ckk;
const int q = (int)(i % ckk);
const int ow = (int)(r % OW);
const int oh = (int)((r / OW) % OH);
const ptrdiff_t n = r / ((ptrdiff_t)OW * OH);
const int kj = q % KW;
const int ki = (q / KW) % KH;
const int c = q / (KW * KH);
const int h = oh * SH - PH + ki;
const int w = ow * SW - PW + kj;
col = (h >= 0 && h < H && w >= 0 && w < W) ? x[((n * C + c) * H + h) * W + w] : (T)0;
"""

_COL2IM_CODE = """
// Gather, not scatter: each input pixel sums the window entries that read it (no atomics,
// deterministic for any stride).
const ptrdiff_t ckk = (ptrdiff_t)C * KH * KW;
const int w = (int)(i % W);
const int h = (int)((i / W) % H);
const int c = (int)((i / ((ptrdiff_t)W * H)) % C);
const ptrdiff_t n = i / ((ptrdiff_t)W * H * C);
T acc = 0;
for (int ki = 0; ki < KH; ++ki) {
    const int hh = h + PH - ki;
    if (hh < 0 || hh % SH != 0) continue;
    const int oh = hh / SH;
    if (oh >= OH) continue;
    for (int kj = 0; kj < KW; ++kj) {
        const int ww = w + PW - kj;
        if (ww < 0 || ww % SW != 0) continue;
        const int ow = ww / SW;
        if (ow >= OW) continue;
        acc += cols[((n * OH + oh) * OW + ow) * ckk + (c * KH + ki) * KW + kj];
    }
}
dx = acc;
"""

_GEOMETRY = "int32 C, int32 H, int32 W, int32 KH, int32 KW, int32 SH, int32 SW, int32 PH, int32 PW, int32 OH, int32 OW"


@functools.lru_cache(maxsize=None)
def _im2col_kernel():
    import cupy
    return cupy.ElementwiseKernel("raw T x, " + _GEOMETRY, "T col", _IM2COL_CODE, "ps_im2col")


@functools.lru_cache(maxsize=None)
def _col2im_kernel():
    import cupy
    return cupy.ElementwiseKernel("raw T cols, " + _GEOMETRY, "T dx", _COL2IM_CODE, "ps_col2im")


def im2col(xp, x, kh: int, kw: int, stride=1, pad=0):
    """Windows of ``x`` (N, C, H, W) as rows: (N*OH*OW, C*kh*kw), row (n, oh, ow), column (c, ki, kj).

    ``stride`` and ``pad`` are ints or (vertical, horizontal) pairs; padding is with zeros.
    """
    (sh, sw), (ph, pw) = pair(stride), pair(pad)
    n, c, h, w = x.shape
    oh, ow = conv_output_hw(h, w, kh, kw, (sh, sw), (ph, pw))
    if is_cupy(xp):
        cols = xp.empty((n * oh * ow, c * kh * kw), x.dtype)
        if cols.size:
            _im2col_kernel()(xp.ascontiguousarray(x), c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, cols)
        return cols
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    win = win[:, :, :sh * (oh - 1) + 1:sh, :sw * (ow - 1) + 1:sw]  # (N, C, OH, OW, kh, kw), a view
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


def col2im(xp, cols, x_shape, kh: int, kw: int, stride=1, pad=0):
    """The adjoint of ``im2col``: sum each row entry of ``cols`` back into an array of ``x_shape``."""
    (sh, sw), (ph, pw) = pair(stride), pair(pad)
    n, c, h, w = x_shape
    oh, ow = conv_output_hw(h, w, kh, kw, (sh, sw), (ph, pw))
    if is_cupy(xp):
        dx = xp.empty(tuple(x_shape), cols.dtype)
        if dx.size:
            _col2im_kernel()(xp.ascontiguousarray(cols), c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, dx)
        return dx
    cols6 = cols.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)  # (N, C, kh, kw, OH, OW)
    dx = np.zeros((n, c, h + 2 * ph, w + 2 * pw), cols.dtype)
    for ki in range(kh):  # kh*kw strided adds, whatever the batch size
        for kj in range(kw):
            dx[:, :, ki:ki + sh * (oh - 1) + 1:sh, kj:kj + sw * (ow - 1) + 1:sw] += cols6[:, :, ki, kj]
    if ph or pw:
        dx = np.ascontiguousarray(dx[:, :, ph:ph + h, pw:pw + w])
    return dx
