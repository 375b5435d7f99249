from ps.v1 import tensor_pb2 as _tensor_pb2
from ps.v1 import optimizer_pb2 as _optimizer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplyAccumulatedRequest(_message.Message):
    __slots__ = ("model", "accumulator", "contributors", "client_id", "seq", "ranges", "members", "wait_s", "member")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATOR_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    model: str
    accumulator: str
    contributors: int
    client_id: str
    seq: int
    ranges: _containers.RepeatedCompositeFieldContainer[Range]
    members: int
    wait_s: float
    member: str
    def __init__(self, model: _Optional[str] = ..., accumulator: _Optional[str] = ..., contributors: _Optional[int] = ..., client_id: _Optional[str] = ..., seq: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[Range, _Mapping]]] = ..., members: _Optional[int] = ..., wait_s: _Optional[float] = ..., member: _Optional[str] = ...) -> None: ...

class ApplyAccumulatedResponse(_message.Message):
    __slots__ = ("applied", "duplicates", "version", "empty", "link", "closed", "closer", "busy")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EMPTY_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    CLOSER_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    applied: int
    duplicates: int
    version: int
    empty: int
    link: str
    closed: bool
    closer: bool
    busy: bool
    def __init__(self, applied: _Optional[int] = ..., duplicates: _Optional[int] = ..., version: _Optional[int] = ..., empty: _Optional[int] = ..., link: _Optional[str] = ..., closed: _Optional[bool] = ..., closer: _Optional[bool] = ..., busy: _Optional[bool] = ...) -> None: ...

class PushBatchRequest(_message.Message):
    __slots__ = ("chunks", "pull")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[PushRequest]
    pull: bool
    def __init__(self, chunks: _Optional[_Iterable[_Union[PushRequest, _Mapping]]] = ..., pull: _Optional[bool] = ...) -> None: ...

class PushBatchResponse(_message.Message):
    __slots__ = ("chunks", "applied", "duplicates")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[PullResponse]
    applied: int
    duplicates: int
    def __init__(self, chunks: _Optional[_Iterable[_Union[PullResponse, _Mapping]]] = ..., applied: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class LocalRange(_message.Message):
    __slots__ = ("tensor", "offset", "length", "at", "dtype")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    offset: int
    length: int
    at: int
    dtype: _tensor_pb2.DType
    def __init__(self, tensor: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., at: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class LocalPushPullRequest(_message.Message):
    __slots__ = ("model", "client_id", "seq", "grad_scale", "segment", "ranges", "pull", "only_pull")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    ONLY_PULL_FIELD_NUMBER: _ClassVar[int]
    model: str
    client_id: str
    seq: int
    grad_scale: float
    segment: str
    ranges: _containers.RepeatedCompositeFieldContainer[LocalRange]
    pull: bool
    only_pull: bool
    def __init__(self, model: _Optional[str] = ..., client_id: _Optional[str] = ..., seq: _Optional[int] = ..., grad_scale: _Optional[float] = ..., segment: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[LocalRange, _Mapping]]] = ..., pull: _Optional[bool] = ..., only_pull: _Optional[bool] = ...) -> None: ...

class LocalPushPullResponse(_message.Message):
    __slots__ = ("applied", "duplicates", "version", "link")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    applied: int
    duplicates: int
    version: int
    link: str
    def __init__(self, applied: _Optional[int] = ..., duplicates: _Optional[int] = ..., version: _Optional[int] = ..., link: _Optional[str] = ...) -> None: ...

class Initializer(_message.Message):
    __slots__ = ("kind", "value", "mean", "std", "low", "high", "seed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    value: float
    mean: float
    std: float
    low: float
    high: float
    seed: int
    def __init__(self, kind: _Optional[str] = ..., value: _Optional[float] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., low: _Optional[float] = ..., high: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class SliceSpec(_message.Message):
    __slots__ = ("tensor", "shape", "dtype", "offset", "length", "init")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: _tensor_pb2.DType
    offset: int
    length: int
    init: Initializer
    def __init__(self, tensor: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., init: _Optional[_Union[Initializer, _Mapping]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("model", "slices", "optimizer", "replace", "tables")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    model: str
    slices: _containers.RepeatedCompositeFieldContainer[SliceSpec]
    optimizer: _optimizer_pb2.OptimizerConfig
    replace: bool
    tables: _containers.RepeatedCompositeFieldContainer[TableSpec]
    def __init__(self, model: _Optional[str] = ..., slices: _Optional[_Iterable[_Union[SliceSpec, _Mapping]]] = ..., optimizer: _Optional[_Union[_optimizer_pb2.OptimizerConfig, _Mapping]] = ..., replace: _Optional[bool] = ..., tables: _Optional[_Iterable[_Union[TableSpec, _Mapping]]] = ...) -> None: ...

class TableSpec(_message.Message):
    __slots__ = ("name", "width", "dtype", "init", "admit_after", "evict_after")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    ADMIT_AFTER_FIELD_NUMBER: _ClassVar[int]
    EVICT_AFTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    width: int
    dtype: _tensor_pb2.DType
    init: Initializer
    admit_after: int
    evict_after: int
    def __init__(self, name: _Optional[str] = ..., width: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., init: _Optional[_Union[Initializer, _Mapping]] = ..., admit_after: _Optional[int] = ..., evict_after: _Optional[int] = ...) -> None: ...

class PullRowsRequest(_message.Message):
    __slots__ = ("model", "table", "ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    table: str
    ids: bytes
    def __init__(self, model: _Optional[str] = ..., table: _Optional[str] = ..., ids: _Optional[bytes] = ...) -> None: ...

class PullRowsResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _tensor_pb2.Tensor
    def __init__(self, rows: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PushRowsRequest(_message.Message):
    __slots__ = ("model", "table", "client_id", "seq", "ids", "grads", "grad_scale")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    model: str
    table: str
    client_id: str
    seq: int
    ids: bytes
    grads: _tensor_pb2.Tensor
    grad_scale: float
    def __init__(self, model: _Optional[str] = ..., table: _Optional[str] = ..., client_id: _Optional[str] = ..., seq: _Optional[int] = ..., ids: _Optional[bytes] = ..., grads: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_scale: _Optional[float] = ...) -> None: ...

class PushRowsResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    def __init__(self, applied: _Optional[bool] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("model", "chunk")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    model: str
    chunk: _tensor_pb2.Chunk
    def __init__(self, model: _Optional[str] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class AssignResponse(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    def __init__(self, chunks: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("model", "client_id", "seq", "grad_scale", "chunk")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    model: str
    client_id: str
    seq: int
    grad_scale: float
    chunk: _tensor_pb2.Chunk
    def __init__(self, model: _Optional[str] = ..., client_id: _Optional[str] = ..., seq: _Optional[int] = ..., grad_scale: _Optional[float] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("duplicate",)
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    def __init__(self, duplicate: _Optional[bool] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("applied", "duplicates")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    applied: int
    duplicates: int
    def __init__(self, applied: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("tensor", "offset", "length")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    offset: int
    length: int
    def __init__(self, tensor: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("model", "ranges", "max_chunk_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    ranges: _containers.RepeatedCompositeFieldContainer[Range]
    max_chunk_bytes: int
    def __init__(self, model: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[Range, _Mapping]]] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("chunk", "version", "duplicate")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    chunk: _tensor_pb2.Chunk
    version: int
    duplicate: bool
    def __init__(self, chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ..., version: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("deleted", "bytes_freed")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    bytes_freed: int
    def __init__(self, deleted: _Optional[bool] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("model", "slices", "params", "bytes", "pushes", "pulls", "max_version", "min_version", "optimizer", "backup_slices", "tables", "member_steps")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BACKUP_SLICES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    MEMBER_STEPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    slices: int
    params: int
    bytes: int
    pushes: int
    pulls: int
    max_version: int
    min_version: int
    optimizer: str
    backup_slices: int
    tables: _containers.RepeatedCompositeFieldContainer[TableStats]
    member_steps: int
    def __init__(self, model: _Optional[str] = ..., slices: _Optional[int] = ..., params: _Optional[int] = ..., bytes: _Optional[int] = ..., pushes: _Optional[int] = ..., pulls: _Optional[int] = ..., max_version: _Optional[int] = ..., min_version: _Optional[int] = ..., optimizer: _Optional[str] = ..., backup_slices: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableStats, _Mapping]]] = ..., member_steps: _Optional[int] = ...) -> None: ...

class TableStats(_message.Message):
    __slots__ = ("name", "rows", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    bytes: int
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("models", "bytes", "uptime_s", "link_calls", "step_waiters")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    LINK_CALLS_FIELD_NUMBER: _ClassVar[int]
    STEP_WAITERS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStats]
    bytes: int
    uptime_s: float
    link_calls: int
    step_waiters: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStats, _Mapping]]] = ..., bytes: _Optional[int] = ..., uptime_s: _Optional[float] = ..., link_calls: _Optional[int] = ..., step_waiters: _Optional[int] = ...) -> None: ...

class SetReplicasRequest(_message.Message):
    __slots__ = ("model", "ranges", "backups", "map_version", "demote")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    BACKUPS_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEMOTE_FIELD_NUMBER: _ClassVar[int]
    model: str
    ranges: _containers.RepeatedCompositeFieldContainer[Range]
    backups: _containers.RepeatedScalarFieldContainer[str]
    map_version: int
    demote: bool
    def __init__(self, model: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[Range, _Mapping]]] = ..., backups: _Optional[_Iterable[str]] = ..., map_version: _Optional[int] = ..., demote: _Optional[bool] = ...) -> None: ...

class SetReplicasResponse(_message.Message):
    __slots__ = ("slices", "bytes_sent")
    SLICES_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    slices: int
    bytes_sent: int
    def __init__(self, slices: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...

class AppliedRecord(_message.Message):
    __slots__ = ("client_id", "seq", "end", "step")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    seq: int
    end: int
    step: int
    def __init__(self, client_id: _Optional[str] = ..., seq: _Optional[int] = ..., end: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class SliceSnapshot(_message.Message):
    __slots__ = ("tensor", "shape", "offset", "length", "param", "state", "version", "pushes", "applied", "closed", "closed_version", "closed_by")
    class StateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    length: int
    param: _tensor_pb2.Tensor
    state: _containers.MessageMap[str, _tensor_pb2.Tensor]
    version: int
    pushes: int
    applied: _containers.RepeatedCompositeFieldContainer[AppliedRecord]
    closed: int
    closed_version: int
    closed_by: str
    def __init__(self, tensor: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., param: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., state: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., version: _Optional[int] = ..., pushes: _Optional[int] = ..., applied: _Optional[_Iterable[_Union[AppliedRecord, _Mapping]]] = ..., closed: _Optional[int] = ..., closed_version: _Optional[int] = ..., closed_by: _Optional[str] = ...) -> None: ...

class ReplicaOp(_message.Message):
    __slots__ = ("install", "push", "assign", "close")
    INSTALL_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    install: SliceSnapshot
    push: PushRequest
    assign: AssignRequest
    close: CloseStep
    def __init__(self, install: _Optional[_Union[SliceSnapshot, _Mapping]] = ..., push: _Optional[_Union[PushRequest, _Mapping]] = ..., assign: _Optional[_Union[AssignRequest, _Mapping]] = ..., close: _Optional[_Union[CloseStep, _Mapping]] = ...) -> None: ...

class CloseStep(_message.Message):
    __slots__ = ("tensor", "offset", "step", "by")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    offset: int
    step: int
    by: str
    def __init__(self, tensor: _Optional[str] = ..., offset: _Optional[int] = ..., step: _Optional[int] = ..., by: _Optional[str] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("model", "optimizer", "primary", "ops")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    optimizer: _optimizer_pb2.OptimizerConfig
    primary: str
    ops: _containers.RepeatedCompositeFieldContainer[ReplicaOp]
    def __init__(self, model: _Optional[str] = ..., optimizer: _Optional[_Union[_optimizer_pb2.OptimizerConfig, _Mapping]] = ..., primary: _Optional[str] = ..., ops: _Optional[_Iterable[_Union[ReplicaOp, _Mapping]]] = ...) -> None: ...

class ReplicateResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: int
    def __init__(self, applied: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("model", "url", "shard")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    model: str
    url: str
    shard: str
    def __init__(self, model: _Optional[str] = ..., url: _Optional[str] = ..., shard: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("files", "bytes", "slices", "versions")
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    bytes: int
    slices: int
    versions: _containers.RepeatedCompositeFieldContainer[SliceVersion]
    def __init__(self, files: _Optional[_Iterable[str]] = ..., bytes: _Optional[int] = ..., slices: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[SliceVersion, _Mapping]]] = ...) -> None: ...

class SliceVersion(_message.Message):
    __slots__ = ("tensor", "offset", "version")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    offset: int
    version: int
    def __init__(self, tensor: _Optional[str] = ..., offset: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...
