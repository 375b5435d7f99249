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
import dataclasses
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "warmup")

# torch.optim's default learning rates (SGD, Adam and AdamW 1e-3; Adagrad and RMSprop 1e-2).
_DEFAULT_LR = {"sgd": 1e-3, "momentum": 1e-3, "nesterov": 1e-3, "adagrad": 1e-2, "rmsprop": 1e-2,
               "adam": 1e-3, "adamw": 1e-3}

# Fields each optimizer reads besides lr, clip_value, clip_norm and schedule; a field that an
# optimizer does not read must keep its default, so that a setting is never silently ignored.
_USES = {
    "sgd": {"weight_decay"},
    "momentum": {"weight_decay", "momentum", "dampening"},
    "nesterov": {"weight_decay", "momentum"},
    "adagrad": {"weight_decay", "eps", "lr_decay", "initial_accumulator_value"},
    "rmsprop": {"weight_decay", "eps", "alpha", "momentum", "centered"},
    "adam": {"weight_decay", "eps", "beta1", "beta2", "amsgrad"},
    "adamw": {"weight_decay", "eps", "beta1", "beta2", "amsgrad"},
}

_INT32_MAX = 2**31 - 1


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or not minimum <= value <= _INT32_MAX:
        raise ValueError(f"{name} must be an integer in [{minimum}, {_INT32_MAX}], got {value!r}")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _unknown_keys(what: str, d: Mapping, cls: type) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise ValueError(f"unknown {what} option {key!r}: expected one of {', '.join(names)}")


@dataclass
class Schedule:
    """How the learning rate changes with the update number; see `lr_at` for the exact formulas.

    kind: "constant" | "step" (needs step_size, uses gamma) | "cosine" (needs total_steps, uses
    min_lr) | "warmup" (needs warmup_steps; after="cosine" also needs total_steps > warmup_steps).
    """

    kind: str = "constant"
    step_size: int | None = None
    gamma: float = 0.1
    total_steps: int | None = None
    min_lr: float = 0.0
    warmup_steps: int | None = None
    after: str = "constant"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule kind {self.kind!r}: expected one of {', '.join(SCHEDULES)}")
        if self.after not in ("constant", "cosine"):
            raise ValueError(f"schedule.after must be 'constant' or 'cosine', got {self.after!r}")
        self.gamma = _number("schedule.gamma", self.gamma)
        if self.gamma < 0:
            raise ValueError(f"schedule.gamma must be >= 0, got {self.gamma!r}")
        self.min_lr = _number("schedule.min_lr", self.min_lr)
        if self.min_lr < 0:
            raise ValueError(f"schedule.min_lr must be >= 0, got {self.min_lr!r}")
        for name in ("step_size", "total_steps", "warmup_steps"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _count(f"schedule.{name}", value))
        need = {"step": ["step_size"], "cosine": ["total_steps"],
                "warmup": ["warmup_steps"] + (["total_steps"] if self.after == "cosine" else [])}
        for name in need.get(self.kind, []):
            if getattr(self, name) is None:
                raise ValueError(f"schedule.{name} is required for a {self.kind!r} schedule"
                                 + (" with after='cosine'" if name == "total_steps" and self.kind == "warmup" else ""))
        if self.kind == "warmup" and self.after == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"schedule.total_steps must exceed schedule.warmup_steps ({self.warmup_steps}) "
                             f"for a warm-up followed by cosine, got {self.total_steps}")

    @classmethod
    def from_dict(cls, d: Mapping) -> Schedule:
        """Build from a plain dict; unknown keys raise ValueError."""
        _unknown_keys("schedule", d, cls)
        return cls(**d)

    def to_dict(self) -> dict:
        """Every field as plain JSON types (None for an unset count)."""
        return dataclasses.asdict(self)


@dataclass
class OptimizerConfig:
    """An optimizer and its settings, named and defaulted as in torch.optim.

    Fields left as None take the chosen optimizer's torch default when the config is built:
    lr (1e-3 for sgd/momentum/nesterov/adam/adamw, 1e-2 for adagrad/rmsprop), momentum (0.9 for
    momentum and nesterov, else 0), eps (1e-10 for adagrad, else 1e-8), weight_decay (0.01 for
    adamw, else 0). weight_decay is L2 added to the gradient, except for adamw (decoupled).
    A setting that the chosen optimizer does not use must be left at its default (ValueError).
    clip_norm is applied by the client (see clip_norm_scale); clip_value by the server.
    """

    name: str = "sgd"
    lr: float | None = None
    momentum: float | None = None
    dampening: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float | None = None
    alpha: float = 0.99
    weight_decay: float | None = None
    initial_accumulator_value: float = 0.0
    lr_decay: float = 0.0
    centered: bool = False
    amsgrad: bool = False
    clip_value: float | None = None
    clip_norm: float | None = None
    schedule: Schedule = field(default_factory=Schedule)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}: expected one of {', '.join(OPTIMIZERS)}")
        if isinstance(self.schedule, Mapping):
            self.schedule = Schedule.from_dict(self.schedule)
        elif self.schedule is None:
            self.schedule = Schedule()
        elif not isinstance(self.schedule, Schedule):
            raise ValueError(f"schedule must be a Schedule or a dict, got {self.schedule!r}")
        name = self.name
        defaults = {"lr": _DEFAULT_LR[name], "momentum": 0.9 if name in ("momentum", "nesterov") else 0.0,
                    "eps": 1e-10 if name == "adagrad" else 1e-8, "weight_decay": 0.01 if name == "adamw" else 0.0}
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key in ("lr", "momentum", "dampening", "beta1", "beta2", "eps", "alpha", "weight_decay",
                    "initial_accumulator_value", "lr_decay"):
            setattr(self, key, _number(key, getattr(self, key)))
        self.centered = _flag("centered", self.centered)
        self.amsgrad = _flag("amsgrad", self.amsgrad)
        for key in ("clip_value", "clip_norm"):
            value = getattr(self, key)
            if value is not None:
                value = _number(key, value)
                if value <= 0:
                    raise ValueError(f"{key} must be > 0 (or left unset), got {value!r}")
                setattr(self, key, value)
        for key in ("lr", "momentum", "weight_decay", "initial_accumulator_value", "lr_decay", "alpha"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")
        if not 0.0 <= self.dampening <= 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {self.dampening!r}")
        if self.alpha > 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if name == "nesterov" and self.momentum <= 0:
            raise ValueError(f"momentum must be > 0 for nesterov, got {self.momentum!r}")
        unset = {f.name: f.default for f in dataclasses.fields(OptimizerConfig)} | defaults
        for key in ("momentum", "dampening", "beta1", "beta2", "eps", "alpha", "weight_decay",
                    "initial_accumulator_value", "lr_decay", "centered", "amsgrad"):
            if key not in _USES[name] and getattr(self, key) != unset[key]:
                users = [n for n in OPTIMIZERS if key in _USES[n]]
                raise ValueError(f"{key}={getattr(self, key)!r} does not apply to {name!r} "
                                 f"(it is used by {', '.join(users)}); leave it unset")

    @classmethod
    def from_dict(cls, d: Mapping) -> OptimizerConfig:
        """Build from a plain dict (schedule may be a nested dict); unknown keys raise ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"optimizer config must be a dict, got {d!r}")
        _unknown_keys("optimizer", d, cls)
        d = dict(d)
        if isinstance(d.get("schedule"), Mapping):
            d["schedule"] = Schedule.from_dict(d["schedule"])
        return cls(**d)

    def to_dict(self) -> dict:
        """Every field, resolved, as plain JSON types (None where a clip is unset)."""
        return dataclasses.asdict(self)

    def to_proto(self):
        """The ps.v1.OptimizerConfig message, every field set explicitly."""
        from ps.v1 import optimizer_pb2
        s = self.schedule
        sched = optimizer_pb2.Schedule(kind=s.kind, after=s.after, gamma=s.gamma, min_lr=s.min_lr)
        for key in ("step_size", "total_steps", "warmup_steps"):
            if getattr(s, key) is not None:
                setattr(sched, key, getattr(s, key))
        msg = optimizer_pb2.OptimizerConfig(name=self.name, schedule=sched)
        for f in dataclasses.fields(self):
            if f.name not in ("name", "schedule") and getattr(self, f.name) is not None:
                setattr(msg, f.name, getattr(self, f.name))
        return msg

    @classmethod
    def from_proto(cls, msg) -> OptimizerConfig:
        """From a ps.v1.OptimizerConfig message: unset optional fields take the defaults."""
        d: dict[str, Any] = {"name": msg.name or "sgd"}
        for f in dataclasses.fields(cls):
            if f.name not in ("name", "schedule") and msg.HasField(f.name):
                d[f.name] = getattr(msg, f.name)
        if msg.HasField("schedule"):
            s = msg.schedule
            sd: dict[str, Any] = {"kind": s.kind or "constant", "after": s.after or "constant"}
            for key in ("step_size", "gamma", "total_steps", "min_lr", "warmup_steps"):
                if s.HasField(key):
                    sd[key] = getattr(s, key)
            d["schedule"] = Schedule(**sd)
        return cls(**d)


def lr_at(config: OptimizerConfig, step: int) -> float:
    """The learning rate of update number `step` (1-based) of a slice.

    With k = step - 1 (the scheduler.step() calls torch makes before update `step` when it steps
    the scheduler once after each optimizer step), and lr = config.lr, T = total_steps,
    W = warmup_steps:
      constant: lr
      step:     lr * gamma ** (k // step_size)                       (StepLR)
      cosine:   min_lr + (lr - min_lr) * (1 + cos(pi * k / T)) / 2   (CosineAnnealingLR, closed
                form) for k < T, then min_lr held (torch's would climb back up after T)
      warmup:   lr * step / W for step <= W (update W is the first at the full lr), then
                after="constant": lr;
                after="cosine": with t = step - W, min_lr + (lr - min_lr) * (1 + cos(pi * t / (T - W))) / 2
                for t < T - W, then min_lr (update T is the first at min_lr).
    """
    s = config.schedule
    lr = config.lr
    k = step - 1
    if s.kind == "constant":
        return lr
    if s.kind == "step":
        return lr * s.gamma ** (k // s.step_size)
    if s.kind == "cosine":
        return _cosine(lr, s.min_lr, k, s.total_steps)
    if step <= s.warmup_steps:
        return lr * step / s.warmup_steps
    if s.after == "constant":
        return lr
    return _cosine(lr, s.min_lr, step - s.warmup_steps, s.total_steps - s.warmup_steps)


def _cosine(lr: float, min_lr: float, t: int, total: int) -> float:
    if t >= total:
        return min_lr
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / total)) / 2


def clip_norm_scale(grads: Iterable[np.ndarray], clip_norm: float | None) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ multiplies every gradient by:
    min(1, clip_norm / (total_norm + 1e-6)), total_norm the L2 norm over all of `grads`."""
    if not clip_norm:
        return 1.0
    total = 0.0
    for g in grads:
        flat = np.asarray(g).reshape(-1)
        if flat.dtype == np.float64:
            total += float(np.dot(flat, flat))
            continue
        for a in range(0, flat.size, 1 << 16):  # float32 partial sums of 64K elements, float64 overall
            b = flat[a:a + (1 << 16)]
            total += float(np.dot(b, b))
    return min(1.0, clip_norm / (math.sqrt(total) + 1e-6))


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
        run = self._block_fn(step)
        states = [state[k] for k in self.state_names]
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


class SGD(Optimizer):
    """Plain SGD: param -= lr * grad. No state."""

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

    def _block_fn(self, step):
        c = self.config
        lr = lr_at(c, step)
        bc1 = 1 - c.beta1 ** step
        bc2_sqrt = math.sqrt(1 - c.beta2 ** step)
        s = -lr * bc2_sqrt / bc1
        eps = c.eps * bc2_sqrt
        w1, b2, w2 = 1.0 - c.beta1, c.beta2, 1.0 - c.beta2
        decay = 1.0 - lr * c.weight_decay if c.name == "adamw" and c.weight_decay else None
        amsgrad = c.amsgrad
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


def make_optimizer(config: OptimizerConfig | Mapping) -> Optimizer:
    """The optimizer for a config (or a config dict); raises ValueError for a bad config."""
    if not isinstance(config, OptimizerConfig):
        config = OptimizerConfig.from_dict(config)
    return _CLASSES[config.name](config)


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
