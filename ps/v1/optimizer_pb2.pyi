from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Schedule(_message.Message):
    __slots__ = ("kind", "step_size", "gamma", "total_steps", "min_lr", "warmup_steps", "after")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    kind: str
    step_size: int
    gamma: float
    total_steps: int
    min_lr: float
    warmup_steps: int
    after: str
    def __init__(self, kind: _Optional[str] = ..., step_size: _Optional[int] = ..., gamma: _Optional[float] = ..., total_steps: _Optional[int] = ..., min_lr: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("name", "lr", "momentum", "dampening", "beta1", "beta2", "eps", "alpha", "weight_decay", "initial_accumulator_value", "lr_decay", "centered", "clip_value", "clip_norm", "schedule", "amsgrad", "beta", "l1", "l2")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    CENTERED_FIELD_NUMBER: _ClassVar[int]
    CLIP_VALUE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    AMSGRAD_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    L1_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    momentum: float
    dampening: float
    beta1: float
    beta2: float
    eps: float
    alpha: float
    weight_decay: float
    initial_accumulator_value: float
    lr_decay: float
    centered: bool
    clip_value: float
    clip_norm: float
    schedule: Schedule
    amsgrad: bool
    beta: float
    l1: float
    l2: float
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., alpha: _Optional[float] = ..., weight_decay: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ..., lr_decay: _Optional[float] = ..., centered: _Optional[bool] = ..., clip_value: _Optional[float] = ..., clip_norm: _Optional[float] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., amsgrad: _Optional[bool] = ..., beta: _Optional[float] = ..., l1: _Optional[float] = ..., l2: _Optional[float] = ...) -> None: ...
