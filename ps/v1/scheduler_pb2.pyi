from ps.v1 import tensor_pb2 as _tensor_pb2
from ps.v1 import optimizer_pb2 as _optimizer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterServerRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class RegisterServerResponse(_message.Message):
    __slots__ = ("server_id", "heartbeat_interval_s")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    heartbeat_interval_s: float
    def __init__(self, server_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("server_id", "bytes", "models")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    bytes: int
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, server_id: _Optional[str] = ..., bytes: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class GetClusterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("server_id", "address", "state", "last_heartbeat_age_s", "bytes", "models")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    address: str
    state: str
    last_heartbeat_age_s: float
    bytes: int
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, server_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., last_heartbeat_age_s: _Optional[float] = ..., bytes: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class ClusterView(_message.Message):
    __slots__ = ("servers", "models")
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: _tensor_pb2.DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class PlanModelRequest(_message.Message):
    __slots__ = ("model", "tensors", "max_slice_bytes", "replace", "optimizer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    MAX_SLICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    model: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    max_slice_bytes: int
    replace: bool
    optimizer: _optimizer_pb2.OptimizerConfig
    def __init__(self, model: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., max_slice_bytes: _Optional[int] = ..., replace: _Optional[bool] = ..., optimizer: _Optional[_Union[_optimizer_pb2.OptimizerConfig, _Mapping]] = ...) -> None: ...

class SliceAssignment(_message.Message):
    __slots__ = ("tensor", "offset", "length", "shard")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    offset: int
    length: int
    shard: int
    def __init__(self, tensor: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., shard: _Optional[int] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("model", "servers", "tensors", "slices", "optimizer", "max_slice_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MAX_SLICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    servers: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    slices: _containers.RepeatedCompositeFieldContainer[SliceAssignment]
    optimizer: _optimizer_pb2.OptimizerConfig
    max_slice_bytes: int
    def __init__(self, model: _Optional[str] = ..., servers: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., slices: _Optional[_Iterable[_Union[SliceAssignment, _Mapping]]] = ..., optimizer: _Optional[_Union[_optimizer_pb2.OptimizerConfig, _Mapping]] = ..., max_slice_bytes: _Optional[int] = ...) -> None: ...

class GetShardMapRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DropModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DropModelResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...
