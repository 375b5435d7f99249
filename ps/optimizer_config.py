"""Optimizer settings (``OptimizerConfig``, learning-rate schedules) and gradient clipping:
plain data and small maths shared by the client (which clips a whole push by its global norm)
and the servers (which run the updates, in ``ps.server.optimizers``).

Semantics follow torch.optim; unset fields take torch.optim's defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "ftrl")
#: optimizers only sparse tables run (FTRL-Proximal: per-coordinate, for sparse logistic regression)
SPARSE_ONLY = ("ftrl",)
DENSE_OPTIMIZERS = tuple(n for n in OPTIMIZERS if n not in SPARSE_ONLY)
SCHEDULES = ("constant", "step", "cosine", "warmup")

# torch.optim's default learning rates (SGD, Adam and AdamW 1e-3; Adagrad and RMSprop 1e-2).
_DEFAULT_LR = {"sgd": 1e-3, "momentum": 1e-3, "nesterov": 1e-3, "adagrad": 1e-2, "rmsprop": 1e-2,
               "adam": 1e-3, "adamw": 1e-3, "ftrl": 0.1}

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
    "ftrl": {"beta", "l1", "l2"},  # lr is the paper's alpha
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


def config_name(config) -> str:
    """The optimizer's name in an OptimizerConfig or its dict."""
    return config.name if isinstance(config, OptimizerConfig) else dict(config).get("name", "sgd")


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
    beta: float = 1.0   # ftrl: the per-coordinate learning rate's smoothing (McMahan et al. 2013)
    l1: float = 0.0     # ftrl: L1 strength (weights with |z| <= l1 are exactly 0)
    l2: float = 0.0     # ftrl: L2 strength
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
                    "initial_accumulator_value", "lr_decay", "beta", "l1", "l2"):
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
        for key in ("lr", "momentum", "weight_decay", "initial_accumulator_value", "lr_decay", "alpha", "beta", "l1",
                    "l2"):
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
        if name == "ftrl" and self.beta == 0 and self.l2 == 0:
            raise ValueError("ftrl: beta must be > 0 (or l2 > 0): a new weight divides by (beta + sqrt(n)) / lr + l2 "
                             "with n = 0")
        if name == "nesterov" and self.momentum <= 0:
            raise ValueError(f"momentum must be > 0 for nesterov, got {self.momentum!r}")
        unset = {f.name: f.default for f in dataclasses.fields(OptimizerConfig)} | defaults
        for key in ("momentum", "dampening", "beta1", "beta2", "eps", "alpha", "weight_decay",
                    "initial_accumulator_value", "lr_decay", "centered", "amsgrad", "beta", "l1", "l2"):
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
