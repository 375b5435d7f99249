"""The worker's hot paths, each a function of the array module ``xp`` first.

On NumPy each runs its reference implementation; on CuPy a fused kernel (built lazily, so
importing this module never needs CuPy) computes the same numbers in one launch. The GPU
tests compare the two.

Every CUDA kernel is a ``cupy.RawKernel`` over contiguous arrays, built from complete CUDA C that
``cuda_sources()`` returns without CuPy, one source per kernel and dtype (float32, float64): CI
compiles each with NVRTC for compute_80 and compute_90 (tests/test_kernels_compile.py), so a
kernel that does not compile fails there, not first on a GPU host.
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


# ---------------------------------------------------------------- CUDA kernels: sources and launches

KERNEL_DTYPES = ("float32", "float64")  # the dtypes every CUDA kernel is built (and compile-checked) for
_CTYPES = {"float32": "float", "float64": "double"}
# dtype -> its kernels' name suffix: a dict lookup, as numpy's dtype.name costs microseconds a call.
_KERNEL_SUFFIX = {np.dtype(name): name for name in KERNEL_DTYPES}


def _kernel_suffix(xp, a) -> str | None:
    """The name suffix of the CUDA kernels for ``a``; None on NumPy, or for a dtype with no kernels."""
    return _KERNEL_SUFFIX.get(a.dtype) if is_cupy(xp) else None


def _contiguous(xp, a):
    return a if a.flags.c_contiguous else xp.ascontiguousarray(a)

# An elementwise kernel: one element per iteration of a grid-stride loop over contiguous arrays,
# flat index ``i``; ``body`` reads its inputs at ``i`` and writes its outputs there. ``size`` is
# always the last parameter.
_ELEMENTWISE_SOURCE = """\
typedef {ctype} T;

extern "C" __global__ void {name}({params}, const long long size) {{
    for (long long _i = (long long)blockIdx.x * blockDim.x + threadIdx.x; _i < size;
         _i += (long long)blockDim.x * gridDim.x) {{
        const ptrdiff_t i = _i;
{body}
    }}
}}
"""


def _elementwise_source(name: str, dtype: str, params: str, body: str) -> str:
    body = "\n".join(("        " + line) if line.strip() else "" for line in body.strip("\n").splitlines())
    return _ELEMENTWISE_SOURCE.format(ctype=_CTYPES[dtype], name=name, params=params, body=body)


_THREADS = 256
_MAX_BLOCKS = 65536  # the grid-stride loops cover any size beyond 256 * 65536 elements


@functools.cache
def _raw_kernel(name: str):
    import cupy
    return cupy.RawKernel(_sources()[name], name)


def _launch(name: str, size: int, args: tuple) -> None:
    """Run elementwise kernel ``name`` over ``size`` elements (nothing to do for 0); ``args`` without ``size``."""
    if size:
        blocks = min((size + _THREADS - 1) // _THREADS, _MAX_BLOCKS)
        _raw_kernel(name)((blocks,), (_THREADS,), (*args, np.int64(size)))


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


def _act_forward_name(act: str, with_bias: bool, dtype: str) -> str:
    return f"ps_{'bias_' if with_bias else ''}{act}_forward_{dtype}"


def _act_backward_name(act: str, dtype: str) -> str:
    return f"ps_{act}_backward_{dtype}"


def _act_forward_source(act: str, with_bias: bool, dtype: str) -> str:
    name = _act_forward_name(act, with_bias, dtype)
    if with_bias:
        # b has shape (nb,) and broadcasts over the rows of z (nb = z's last axis, z contiguous).
        params = ("const T* __restrict__ z_, const T* __restrict__ b_, const long long nb, const double alpha, "
                  "T* __restrict__ y_")
        load = "const T z = z_[i];\nconst T b = b_[i % nb];\nT y;\nT v = z + b; "
    else:
        params = "const T* __restrict__ z_, const double alpha, T* __restrict__ y_"
        load = "const T z = z_[i];\nT y;\nT v = z; "
    return _elementwise_source(name, dtype, params, load + _FWD_CODE[act] + "\ny_[i] = y;")


def _act_backward_source(act: str, dtype: str) -> str:
    params = ("const T* __restrict__ g_, const T* __restrict__ y_, const double alpha, "
              "T* __restrict__ dz_")
    body = "const T g = g_[i];\nconst T y = y_[i];\nT dz;\n" + _BWD_CODE[act] + "\ndz_[i] = dz;"
    return _elementwise_source(_act_backward_name(act, dtype), dtype, params, body)


def bias_act_forward(xp, z, b, act: str, alpha: float = 0.01):
    """``act(z + b)`` with ``b`` (shape (n,), or None for no bias) broadcast over the last axis of ``z``."""
    _check_act(act)
    suffix = _kernel_suffix(xp, z)
    if suffix is not None:
        z = _contiguous(xp, z)
        if b is not None:
            b = b.astype(z.dtype, copy=False)
            if b.shape != z.shape[-1:]:
                # Any other broadcast: add in z's dtype (as the fused kernel does), then activate.
                return bias_act_forward(xp, z + b, None, act, alpha)
        y = xp.empty(z.shape, z.dtype)
        if b is None:
            _launch(_act_forward_name(act, False, suffix), y.size, (z, np.float64(alpha), y))
        else:
            _launch(_act_forward_name(act, True, suffix), y.size,
                    (z, _contiguous(xp, b), np.int64(b.size), np.float64(alpha), y))
        return y
    v = z if b is None else z + b
    return _act_ref(xp, v, act, alpha)


def bias_act_backward(xp, grad_out, out, act: str, alpha: float = 0.01, bias: bool = True):
    """(grad wrt the pre-activation, grad wrt the bias or None) from the output ``out`` of ``bias_act_forward``.

    The bias gradient sums the pre-activation gradient over every axis but the last.
    """
    _check_act(act)
    suffix = _kernel_suffix(xp, grad_out)
    if suffix is not None:
        if out.dtype != grad_out.dtype:
            raise TypeError(f"bias_act_backward: grad_out is {grad_out.dtype} but out is {out.dtype}")
        if grad_out.shape != out.shape:
            grad_out, out = xp.broadcast_arrays(grad_out, out)
        grad_out, out = _contiguous(xp, grad_out), _contiguous(xp, out)
        dz = xp.empty(out.shape, out.dtype)
        _launch(_act_backward_name(act, suffix), dz.size, (grad_out, out, np.float64(alpha), dz))
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


_SOFTMAX_XENT_ROWS_CODE = r"""
extern "C" __global__ void ps_softmax_xent_rows_REAL(const REAL* logits, const long long* labels, const long long n,
                                                     const long long c, const REAL inv_n, REAL* dlogits,
                                                     REAL* losses, int* correct) {
    // One block of 256 threads per row, striding over the classes (wide outputs): block reductions for
    // the max (first index on ties, as the one-thread kernel) and the sum of exponentials.
    __shared__ REAL sv[256];
    __shared__ long long si[256];
    const long long i = blockIdx.x;
    if (i >= n) return;
    const int t = threadIdx.x;
    const REAL* row = logits + i * c;
    REAL* drow = dlogits + i * c;
    long long arg = t < c ? t : 0;
    REAL m = row[arg];
    for (long long j = t + blockDim.x; j < c; j += blockDim.x) {
        if (row[j] > m) { m = row[j]; arg = j; }
    }
    sv[t] = m;
    si[t] = arg;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (t < h && (sv[t + h] > sv[t] || (sv[t + h] == sv[t] && si[t + h] < si[t]))) {
            sv[t] = sv[t + h];
            si[t] = si[t + h];
        }
        __syncthreads();
    }
    m = sv[0];
    arg = si[0];
    __syncthreads();
    REAL s = 0;
    for (long long j = t; j < c; j += blockDim.x) s += EXP(row[j] - m);
    sv[t] = s;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (t < h) sv[t] += sv[t + h];
        __syncthreads();
    }
    s = sv[0];
    const long long y = labels[i];
    if (y < 0 || y >= c) {  // out-of-range label: poison the loss instead of reading out of bounds
        for (long long j = t; j < c; j += blockDim.x) drow[j] = NAN_VALUE;
        if (t == 0) { losses[i] = NAN_VALUE; correct[i] = 0; }
        return;
    }
    const REAL inv_s = (REAL)1 / s;
    for (long long j = t; j < c; j += blockDim.x) {
        drow[j] = (EXP(row[j] - m) * inv_s - (j == y ? (REAL)1 : (REAL)0)) * inv_n;
    }
    if (t == 0) {
        losses[i] = LOG(s) + m - row[y];
        correct[i] = arg == y ? 1 : 0;
    }
}
"""
#: from this many classes on, a row gets a block of threads instead of one thread
WIDE_CLASSES = 256


def _softmax_xent_source(dtype: str, code: str = _SOFTMAX_XENT_CODE, name: str = "ps_softmax_xent") -> str:
    if dtype == "float32":
        real, exp, log, nan = "float", "expf", "logf", "__int_as_float(0x7fc00000)"
    else:
        real, exp, log, nan = "double", "exp", "log", "__longlong_as_double(0x7ff8000000000000LL)"
    return (code.replace(f"{name}_REAL", f"{name}_{dtype}")
            .replace("NAN_VALUE", nan).replace("REAL", real).replace("EXP", exp).replace("LOG", log).lstrip("\n"))


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


def loss_stats(xp, total, count, size: int, lazy: bool):
    """(mean loss, n_correct) from a device loss sum and correct count over ``size`` elements.

    Read back together: one host synchronisation, not two. With ``lazy`` they stay on the device as
    one float64 pair [mean loss, n_correct], returned in the loss's place (and None for the count),
    for a caller that copies them to the host with the step's gradients: no synchronisation here.
    """
    pair = xp.stack([total.astype(np.float64) / max(size, 1), count.astype(np.float64)])
    if lazy:
        return pair, None
    both = pair.get()
    return float(both[0]), int(both[1])


def softmax_xent(xp, logits, labels, lazy: bool = False):
    """Mean softmax cross-entropy of ``logits`` (N, C) against integer ``labels`` (N,).

    Returns (mean loss as a float, dloss/dlogits (N, C), number of rows whose argmax is the label);
    with ``lazy`` on CuPy, (the device pair [mean loss, n_correct], dloss/dlogits, None): see ``loss_stats``.
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
    args = (logits, labels, np.int64(n), np.int64(c), logits.dtype.type(1.0 / n), d, losses, correct)
    if n and c >= WIDE_CLASSES:  # a block per row: its threads share the classes
        _raw_kernel(f"ps_softmax_xent_rows_{_KERNEL_SUFFIX[logits.dtype]}")((n,), (256,), args)
    elif n:
        threads = 128
        _raw_kernel(f"ps_softmax_xent_{_KERNEL_SUFFIX[logits.dtype]}")(((n + threads - 1) // threads,), (threads,),
                                                                         args)
    loss, n_correct = loss_stats(xp, losses.sum(), correct.sum(), n, lazy)
    return loss, d, n_correct


# ---------------------------------------------------------------- binary cross-entropy with logits

_BCE_CODE = """
// max(z, 0) - z t + log(1 + exp(-|z|)) is log(1 + exp(z)) - z t without overflow.
const T e = exp(z >= (T)0 ? -z : z);
loss = (z > (T)0 ? z : (T)0) - z * t + log1p(e);
const T s = z >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
dz = (s - t) * inv_n;
ok = ((z > (T)0) == (t > (T)0.5)) ? 1 : 0;
"""


def _bce_source(dtype: str) -> str:
    params = ("const T* __restrict__ z_, const T* __restrict__ t_, const T inv_n, T* __restrict__ loss_, "
              "T* __restrict__ dz_, int* __restrict__ ok_")
    body = ("const T z = z_[i];\nconst T t = t_[i];\nT loss;\nT dz;\nint ok;" + _BCE_CODE
            + "loss_[i] = loss;\ndz_[i] = dz;\nok_[i] = ok;")
    return _elementwise_source(f"ps_bce_logits_{dtype}", dtype, params, body)


def bce_logits(xp, logits, targets, lazy: bool = False):
    """Mean binary cross-entropy of ``logits`` against 0/1 ``targets`` (same number of elements).

    Returns (mean loss as a float, dloss/dlogits shaped like ``logits``, number of elements
    where ``logits > 0`` agrees with ``targets > 0.5``); ``lazy`` as for ``softmax_xent``.
    """
    targets = targets.reshape(logits.shape).astype(logits.dtype, copy=False)
    size = max(logits.size, 1)
    suffix = _kernel_suffix(xp, logits)
    if suffix is not None:
        z, t = _contiguous(xp, logits), _contiguous(xp, targets)
        loss, d, ok = xp.empty(z.shape, z.dtype), xp.empty(z.shape, z.dtype), xp.empty(z.shape, np.int32)
        _launch(f"ps_bce_logits_{suffix}", z.size, (z, t, z.dtype.type(1.0 / size), loss, d, ok))
        loss, n_correct = loss_stats(xp, loss.sum(), ok.sum(), size, lazy)
        return loss, d, n_correct
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

_GEOMETRY = ("const int C, const int H, const int W, const int KH, const int KW, const int SH, const int SW, "
             "const int PH, const int PW, const int OH, const int OW")


def _im2col_source(dtype: str) -> str:
    # One output element (row (n, oh, ow), column (c, ki, kj)) per index i of the contiguous cols.
    params = "const T* __restrict__ x, " + _GEOMETRY + ", T* __restrict__ col_"
    return _elementwise_source(f"ps_im2col_{dtype}", dtype, params, "T col;" + _IM2COL_CODE + "col_[i] = col;")


def _col2im_source(dtype: str) -> str:
    # One pixel (n, c, h, w) of the contiguous dx per index i.
    params = "const T* __restrict__ cols, " + _GEOMETRY + ", T* __restrict__ dx_"
    return _elementwise_source(f"ps_col2im_{dtype}", dtype, params, "T dx;" + _COL2IM_CODE + "dx_[i] = dx;")


def _geometry_args(c, h, w, kh, kw, sh, sw, ph, pw, oh, ow) -> tuple:
    return tuple(np.int32(v) for v in (c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))


def _kernel_dtype(dtype) -> np.dtype:
    """The dtype a CUDA kernel computes ``dtype`` in: itself when built for it, else float64."""
    return dtype if dtype in _KERNEL_SUFFIX else np.dtype(np.float64)


def im2col(xp, x, kh: int, kw: int, stride=1, pad=0):
    """Windows of ``x`` (N, C, H, W) as rows: (N*OH*OW, C*kh*kw), row (n, oh, ow), column (c, ki, kj).

    ``stride`` and ``pad`` are ints or (vertical, horizontal) pairs; padding is with zeros.
    """
    (sh, sw), (ph, pw) = pair(stride), pair(pad)
    n, c, h, w = x.shape
    oh, ow = conv_output_hw(h, w, kh, kw, (sh, sw), (ph, pw))
    if is_cupy(xp):
        # Kernels exist for float32 and float64; any other dtype is gathered in float64 (exact) and cast back.
        kt = _kernel_dtype(x.dtype)
        cols = xp.empty((n * oh * ow, c * kh * kw), kt)
        geometry = _geometry_args(c, h, w, kh, kw, sh, sw, ph, pw, oh, ow)
        xc = _contiguous(xp, x.astype(kt, copy=False))
        _launch(f"ps_im2col_{_KERNEL_SUFFIX[kt]}", cols.size, (xc, *geometry, cols))
        return cols if kt == x.dtype else cols.astype(x.dtype)
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
        # Kernels exist for float32 and float64; any other dtype is summed in float64 and cast back.
        kt = _kernel_dtype(cols.dtype)
        dx = xp.empty(tuple(x_shape), kt)
        geometry = _geometry_args(c, h, w, kh, kw, sh, sw, ph, pw, oh, ow)
        cc = _contiguous(xp, cols.astype(kt, copy=False))
        _launch(f"ps_col2im_{_KERNEL_SUFFIX[kt]}", dx.size, (cc, *geometry, dx))
        return dx if kt == cols.dtype else dx.astype(cols.dtype)
    cols6 = cols.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)  # (N, C, kh, kw, OH, OW)
    dx = np.zeros((n, c, h + 2 * ph, w + 2 * pw), cols.dtype)
    for ki in range(kh):  # kh*kw strided adds, whatever the batch size
        for kj in range(kw):
            dx[:, :, ki:ki + sh * (oh - 1) + 1:sh, kj:kj + sw * (ow - 1) + 1:sw] += cols6[:, :, ki, kj]
    if ph or pw:
        dx = np.ascontiguousarray(dx[:, :, ph:ph + h, pw:pw + w])
    return dx


# ---------------------------------------------------------------- sparse rows: distinct ids, lookups, sums by row

def unique_ids(xp, x):
    """(ids, local) for integer ids ``x`` of any shape, -1 meaning "no id here": ``ids`` the distinct
    ids of ``x`` other than -1, sorted (1-D int64), and ``local`` ``x`` as positions in ``ids`` (int64,
    the shape of ``x``, -1 kept), so that ``ids[local] == x`` wherever ``x != -1``."""
    flat = x.reshape(-1)
    valid = flat != -1
    ids, inverse = xp.unique(flat[valid], return_inverse=True)
    local = xp.full(flat.shape, -1, np.int64)
    local[valid] = inverse.reshape(-1)
    return ids.astype(np.int64, copy=False), local.reshape(x.shape)


def take_rows(xp, rows, index):
    """``rows[index]`` for ``rows`` (u, width) and positions ``index`` (any shape) in [-1, u), with a
    row of zeros where ``index`` is -1: shape (*index.shape, width)."""
    padded = xp.concatenate([rows, xp.zeros((1, rows.shape[1]), rows.dtype)])
    return xp.take(padded, index, axis=0)  # -1 takes the last row: the zeros just appended


def scatter_add_rows(xp, index, values, n_rows: int):
    """Sums of the rows of ``values`` (k, width) by ``index`` (k,), positions in [-1, n_rows): row j
    of the (n_rows, width) result adds every ``values[i]`` with ``index[i] == j``; -1 adds nothing.

    NumPy sums each element in float64 (one ``bincount``, several times faster than ``np.add.at``);
    CuPy adds with atomics (``cupy.add.at``), in no fixed order: float32 sums may differ in the last bits.
    """
    width = values.shape[1]
    rows = xp.where(index == -1, n_rows, index)  # -1 lands in a spare last row, dropped below
    if is_cupy(xp):
        out = xp.zeros((n_rows + 1, width), values.dtype)
        xp.add.at(out, rows, values)  # CuPy's add.at is one kernel of atomic adds (cupyx.scatter_add's successor)
        return out[:n_rows]
    keys = (rows[:, None] * width + np.arange(width)).reshape(-1)  # element (row, column) as one bin
    sums = np.bincount(keys, weights=values.reshape(-1), minlength=(n_rows + 1) * width)
    return sums[:n_rows * width].reshape(n_rows, width).astype(values.dtype, copy=False)


# ---------------------------------------------------------------- every CUDA source

@functools.cache
def _sources() -> dict[str, str]:
    out = {}
    for dtype in KERNEL_DTYPES:
        for act in ACTIVATIONS:
            for with_bias in (True, False):
                out[_act_forward_name(act, with_bias, dtype)] = _act_forward_source(act, with_bias, dtype)
            out[_act_backward_name(act, dtype)] = _act_backward_source(act, dtype)
        out[f"ps_softmax_xent_{dtype}"] = _softmax_xent_source(dtype)
        out[f"ps_softmax_xent_rows_{dtype}"] = _softmax_xent_source(dtype, _SOFTMAX_XENT_ROWS_CODE,
                                                                   "ps_softmax_xent_rows")
        out[f"ps_bce_logits_{dtype}"] = _bce_source(dtype)
        out[f"ps_im2col_{dtype}"] = _im2col_source(dtype)
        out[f"ps_col2im_{dtype}"] = _col2im_source(dtype)
    return out


def cuda_sources() -> dict[str, str]:
    """Every CUDA kernel the worker can launch, as complete CUDA C (no CuPy needed): kernel name -> source.

    One entry per kernel, activation, bias or none, and dtype in ``KERNEL_DTYPES``; each source
    defines one ``extern "C" __global__`` function named like its key. The CuPy path builds its
    kernels from exactly these sources (``cupy.RawKernel(source, name)``), and CI compiles every
    one with NVRTC for compute_80 and compute_90 without a GPU (tests/test_kernels_compile.py).
    """
    return dict(_sources())
