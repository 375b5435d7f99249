"""Server-side optimizers: torch.optim's updates as pure, in-place, blocked NumPy functions.

An optimizer updates a 1-D parameter view and its state views in place from a gradient view:

    opt = make_optimizer({"name": "adam", "lr": 1e-3})
    state = opt.init_state(param.size, param.dtype)
    opt.apply(param, grad, state, step=1)          # step: 1-based update number of this slice

Every update equals torch.optim's single-tensor update for the same settings (checked against
a fixture that torch generated, tests/fixtures/torch_optim_reference.json). The arithmetic is
done block by block over cache-sized pieces with `out=` ufuncs into a per-thread scratch
buffer, so a call allocates nothing of the array's size and each block stays in cache while
all of its passes run (float32 Adam: ~0.55 of the memory-copy limit, whole-array NumPy ~0.2).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Mapping

import numpy as np

from ps.optimizer_config import OptimizerConfig, lr_at
from ps.server import jit


# Bytes per array per block. Measured on a 2-core EPYC (1 MiB L2, 32 MiB L3), float32 Adam on
# 16M params: 64 KiB 0.47, 128 KiB 0.50, 256 KiB 0.52, 512 KiB 0.53 of the copy limit, but
# 512 KiB lost a third with two threads updating at once; per-ufunc-call overhead (~0.3 us)
# is what small blocks pay, cache misses what large ones pay.
_BLOCK_BYTES = 256 * 1024
_free_scratch: dict[np.dtype, list[np.ndarray]] = {}
_scratch_lock = threading.Lock()


@contextlib.contextmanager
def _scratch(dtype: np.dtype, rows: int, block: int):
    """`rows` 1-D buffers of `block` elements, for the caller alone until the block exits.

    Buffers come from a shared free list rather than per thread: a server runs updates on
    whichever of its many RPC threads received the push, and per-thread buffers held memory
    for every thread that ever updated; the list holds one set per update running at once."""
    with _scratch_lock:
        free = _free_scratch.setdefault(dtype, [])
        buf = free.pop() if free else None
    if buf is None or buf.shape[0] < rows or buf.shape[1] < block:
        buf = np.empty((max(rows, 3), max(block, _BLOCK_BYTES // dtype.itemsize)), dtype)
    try:
        yield [buf[i, :block] for i in range(rows)]
    finally:
        with _scratch_lock:
            _free_scratch[dtype].append(buf)


class Optimizer:
    """One optimizer: its config, the names of its per-element state arrays, and the update."""

    state_names: tuple[str, ...] = ()

    def __init__(self, config: OptimizerConfig):
        self.config = config
        self.l2 = 0.0 if config.name == "adamw" else config.weight_decay

    def init_state(self, n: int, dtype) -> dict[str, np.ndarray]:
        """Fresh state for n elements: 1-D arrays of the parameter's dtype."""
        return {k: np.zeros(n, dtype) for k in self.state_names}

    def apply(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int,
              grad_scale: float = 1.0) -> None:
        """Update `param` and `state` in place from `grad` (read only), as update number `step`.

        The gradient seen by the optimizer is grad * grad_scale, clamped to +-clip_value, plus
        weight_decay * param (L2; not for adamw). `step` (1-based) drives bias correction and lr_at.
        """
        n = param.shape[0]
        if param.ndim != 1 or grad.shape != param.shape or any(state[k].shape != param.shape
                                                                for k in self.state_names):
            raise ValueError(f"{self.config.name} update: param {param.shape}, grad {grad.shape} and state "
                             f"{[state[k].shape for k in self.state_names]} must be 1-D of one length")
        if step < 1:
            raise ValueError(f"{self.config.name} update: step must be >= 1, got {step}")
        if n == 0:
            return
        dtype = param.dtype
        block = max(1024, _BLOCK_BYTES // dtype.itemsize)
        clip = self.config.clip_value
        scale = float(grad_scale)
        prep = scale != 1.0 or clip is not None or self.l2 != 0.0
        states = [state[k] for k in self.state_names]
        if not prep and jit.enabled():
            whole = self._jit_fn(step, dtype.type)
            if whole is not None:  # one compiled pass over the whole range
                whole(param, grad, states)
                return
        run = self._block_fn(step)
        with _scratch(dtype, 3, min(block, n)) as (g0, x, y):
            for a in range(0, n, block):
                p = param[a:a + block]
                m = p.shape[0]
                if m != g0.shape[0]:
                    g0, x, y = g0[:m], x[:m], y[:m]
                g = grad[a:a + block]
                if prep:
                    g = self._grad(g, p, scale, clip, g0, x)
                run(p, g, [s[a:a + block] for s in states], x, y)

    def _grad(self, g, p, scale, clip, out, tmp):
        """Scale, clamp (clip_grad_value_) and add L2 decay, as torch does, into `out`."""
        if scale != 1.0:
            np.multiply(g, scale, out)
        elif clip is not None:
            np.copyto(out, g)
        if clip is not None:
            np.clip(out, -clip, clip, out=out)
        if self.l2 != 0.0:
            if scale != 1.0 or clip is not None:
                np.multiply(p, self.l2, tmp)
                np.add(out, tmp, out)
            else:
                np.multiply(p, self.l2, out)
                np.add(g, out, out)
        return out

    def _block_fn(self, step: int):
        """A function (param, grad, states, x, y) updating one block; x, y are scratch."""
        raise NotImplementedError

    def _jit_fn(self, step: int, t):
        """A compiled function (param, grad, states) doing the whole update (``ps.server.jit``), for
        scalars of type ``t``; None where there is none (the blocked NumPy passes run)."""
        return None


class SGD(Optimizer):
    """Plain SGD: param -= lr * grad. No state."""

    def _jit_fn(self, step, t):
        neg_lr = t(-lr_at(self.config, step))
        return lambda p, g, states: jit.sgd(p, g, neg_lr)

    def _block_fn(self, step):
        neg_lr = -lr_at(self.config, step)
        mul, add = np.multiply, np.add

        def run(p, g, states, x, y):
            mul(g, neg_lr, x)
            add(p, x, p)
        return run


class Momentum(Optimizer):
    """SGD with momentum (torch.optim.SGD momentum>0), heavy-ball or nesterov.

    buf = grad on update 1 (torch clones the gradient), else momentum * buf + (1 - dampening) * grad;
    param -= lr * buf (or lr * (grad + momentum * buf) for nesterov)."""

    state_names = ("momentum_buffer",)

    def _block_fn(self, step):
        c = self.config
        neg_lr, mu, damp = -lr_at(c, step), c.momentum, 1.0 - c.dampening
        nesterov = c.name == "nesterov"
        mul, add = np.multiply, np.add

        def run(p, g, states, x, y):
            buf, = states
            if step == 1:
                np.copyto(buf, g)
            else:
                mul(buf, mu, buf)
                if damp != 1.0:
                    mul(g, damp, x)
                    add(buf, x, buf)
                else:
                    add(buf, g, buf)
            if nesterov:
                mul(buf, mu, x)
                add(x, g, x)
                mul(x, neg_lr, x)
            else:
                mul(buf, neg_lr, x)
            add(p, x, p)
        return run


class Adagrad(Optimizer):
    """Adagrad: sum += grad^2; param -= lr / (1 + (step - 1) * lr_decay) * grad / (sqrt(sum) + eps)."""

    state_names = ("sum",)

    def init_state(self, n, dtype):
        return {"sum": np.full(n, self.config.initial_accumulator_value, dtype)}

    def _block_fn(self, step):
        c = self.config
        neg_clr = -lr_at(c, step) / (1 + (step - 1) * c.lr_decay)
        eps = c.eps
        mul, add, square, sqrt, div = np.multiply, np.add, np.square, np.sqrt, np.divide

        def run(p, g, states, x, y):
            acc, = states
            square(g, x)
            add(acc, x, acc)
            sqrt(acc, x)
            add(x, eps, x)
            div(g, x, x)
            mul(x, neg_clr, x)
            add(p, x, p)
        return run


class RMSprop(Optimizer):
    """RMSprop (torch.optim.RMSprop): square_avg = alpha * square_avg + (1 - alpha) * grad^2;
    avg = sqrt(square_avg [- grad_avg^2 if centered]) + eps; with momentum, buf = momentum * buf +
    grad / avg and param -= lr * buf, else param -= lr * grad / avg."""

    def __init__(self, config):
        super().__init__(config)
        self.state_names = (("square_avg",) + (("grad_avg",) if config.centered else ())
                            + (("momentum_buffer",) if config.momentum > 0 else ()))

    def _block_fn(self, step):
        c = self.config
        neg_lr, alpha, w, eps, mu = -lr_at(c, step), c.alpha, 1.0 - c.alpha, c.eps, c.momentum
        centered = c.centered
        mul, add, sub, square, sqrt, div = np.multiply, np.add, np.subtract, np.square, np.sqrt, np.divide

        def run(p, g, states, x, y):
            sq = states[0]
            mul(sq, alpha, sq)
            square(g, x)
            mul(x, w, x)
            add(sq, x, sq)
            if centered:
                ga = states[1]
                sub(g, ga, x)          # grad_avg.lerp_(grad, 1 - alpha)
                mul(x, w, x)
                add(ga, x, ga)
                square(ga, x)
                sub(sq, x, x)
                sqrt(x, x)
            else:
                sqrt(sq, x)
            add(x, eps, x)
            div(g, x, x)
            if mu > 0:
                buf = states[-1]
                mul(buf, mu, buf)
                add(buf, x, buf)
                mul(buf, neg_lr, x)
            else:
                mul(x, neg_lr, x)
            add(p, x, p)
        return run


class Adam(Optimizer):
    """Adam / AdamW (torch.optim.Adam, AdamW), with amsgrad.

    exp_avg += (1 - beta1) * (grad - exp_avg)   (torch's lerp)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2
    param -= lr / bc1 * exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps),  bc_i = 1 - beta_i^step;
    computed as param += s * exp_avg / (sqrt(exp_avg_sq) + eps * sqrt(bc2)) with the scalar
    s = -lr * sqrt(bc2) / bc1, which is the same quotient and saves a pass. adamw first does
    param *= 1 - lr * weight_decay.
    """

    def __init__(self, config):
        super().__init__(config)
        self.state_names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if config.amsgrad else ())

    def _scalars(self, step):
        """(s, eps, w1, b2, w2, decay or None): the update's scalars for update number ``step``."""
        c = self.config
        lr = lr_at(c, step)
        bc1 = 1 - c.beta1 ** step
        bc2_sqrt = math.sqrt(1 - c.beta2 ** step)
        decay = 1.0 - lr * c.weight_decay if c.name == "adamw" and c.weight_decay else None
        return -lr * bc2_sqrt / bc1, c.eps * bc2_sqrt, 1.0 - c.beta1, c.beta2, 1.0 - c.beta2, decay

    def _jit_fn(self, step, t):
        if self.config.amsgrad:
            return None
        s, eps, w1, b2, w2, decay = (t(1.0 if v is None else v) for v in self._scalars(step))
        return lambda p, g, states: jit.adam(p, g, states[0], states[1], s, eps, w1, b2, w2, decay)

    def _block_fn(self, step):
        s, eps, w1, b2, w2, decay = self._scalars(step)
        amsgrad = self.config.amsgrad
        mul, add, sub, square, sqrt, div, maximum = (np.multiply, np.add, np.subtract, np.square, np.sqrt,
                                                     np.divide, np.maximum)

        def run(p, g, states, x, y):
            m, v = states[0], states[1]
            sub(g, m, x)
            mul(x, w1, x)
            add(m, x, m)
            mul(v, b2, v)
            square(g, x)
            mul(x, w2, x)
            add(v, x, v)
            if amsgrad:
                vmax = states[2]
                maximum(vmax, v, out=vmax)
                v = vmax
            sqrt(v, x)
            add(x, eps, x)
            div(m, x, x)
            mul(x, s, x)
            if decay is not None:
                mul(p, decay, p)
            add(p, x, p)
        return run


_CLASSES = {"sgd": SGD, "momentum": Momentum, "nesterov": Momentum, "adagrad": Adagrad,
            "rmsprop": RMSprop, "adam": Adam, "adamw": Adam}


class SparseOnly(Optimizer):
    """The dense side of a model whose optimizer only sparse tables run (ftrl): it has no dense
    parameters to update (ShardStore.create refuses any)."""

    def apply(self, param, grad, state, step, grad_scale=1.0) -> None:
        raise ValueError(f"{self.config.name} updates sparse tables only, not dense parameters")


def make_optimizer(config: OptimizerConfig | Mapping) -> Optimizer:
    """The optimizer for a config (or a config dict); raises ValueError for a bad config."""
    if not isinstance(config, OptimizerConfig):
        config = OptimizerConfig.from_dict(config)
    return _CLASSES.get(config.name, SparseOnly)(config)


# Bytes of memory traffic per parameter of one update, float32: param read + write (8), grad
# read (4), and each state array read + write (8 each).
BYTES_PER_PARAM = {"sgd": 12, "momentum": 20, "nesterov": 20, "adagrad": 20, "rmsprop": 20,
                   "adam": 28, "adamw": 28}


def update_rate(name: str, n: int = 16_000_000, repeats: int = 5) -> dict:
    """Update throughput of `name` on n float32 params in one thread, against the memory limit.

    copyto_bytes_per_s is n * 4 / (best np.copyto time) -- bytes copied, each read once and
    written once -- so the memory moves 2 * copyto_bytes_per_s. An update must move
    BYTES_PER_PARAM[name] bytes per param (param r+w 8, grad r 4, each state array r+w 8: sgd 12,
    momentum/nesterov/adagrad/rmsprop 20, adam/adamw 28), so limit_params_per_s =
    2 * copyto_bytes_per_s / BYTES_PER_PARAM[name]; to_limit_ratio = params_per_s / limit.
    """
    opt = make_optimizer({"name": name, "lr": 1e-3})
    rng = np.random.default_rng(0)
    param = rng.standard_normal(n, dtype=np.float32)
    grad = rng.standard_normal(n, dtype=np.float32)
    state = opt.init_state(n, np.float32)
    dst = np.empty_like(param)
    copy_s = update_s = math.inf
    for r in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, param)
        copy_s = min(copy_s, time.perf_counter() - t)
        t = time.perf_counter()
        opt.apply(param, grad, state, r + 1)
        update_s = min(update_s, time.perf_counter() - t)
    copyto = n * 4 / copy_s
    limit = 2 * copyto / BYTES_PER_PARAM[name]
    rate = n / update_s
    return {"optimizer": name, "params_per_s": rate, "copyto_bytes_per_s": copyto,
            "limit_params_per_s": limit, "to_limit_ratio": rate / limit}
