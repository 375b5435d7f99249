from ps.v1 import tensor_pb2 as _tensor_pb2
from ps.v1 import optimizer_pb2 as _optimizer_pb2
from ps.v1 import server_pb2 as _server_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterServerRequest(_message.Message):
    __slots__ = ("address", "instance")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    address: str
    instance: str
    def __init__(self, address: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class RegisterServerResponse(_message.Message):
    __slots__ = ("server_id", "heartbeat_interval_s", "cluster_id", "incarnation")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    heartbeat_interval_s: float
    cluster_id: str
    incarnation: int
    def __init__(self, server_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., cluster_id: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("server_id", "bytes", "models", "cluster_id")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    bytes: int
    models: _containers.RepeatedScalarFieldContainer[str]
    cluster_id: str
    def __init__(self, server_id: _Optional[str] = ..., bytes: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., cluster_id: _Optional[str] = ...) -> None: ...

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

class SliceReplicas(_message.Message):
    __slots__ = ("model", "shard", "servers", "wanted")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    model: str
    shard: int
    servers: _containers.RepeatedScalarFieldContainer[str]
    wanted: int
    def __init__(self, model: _Optional[str] = ..., shard: _Optional[int] = ..., servers: _Optional[_Iterable[str]] = ..., wanted: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "name", "device", "last_heartbeat_age_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    name: str
    device: str
    last_heartbeat_age_s: float
    def __init__(self, worker_id: _Optional[str] = ..., name: _Optional[str] = ..., device: _Optional[str] = ..., last_heartbeat_age_s: _Optional[float] = ...) -> None: ...

class ClusterView(_message.Message):
    __slots__ = ("servers", "models", "workers", "under_replicated", "cluster_id", "incarnation")
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    UNDER_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    models: _containers.RepeatedScalarFieldContainer[str]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    under_replicated: _containers.RepeatedCompositeFieldContainer[SliceReplicas]
    cluster_id: str
    incarnation: int
    def __init__(self, servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., under_replicated: _Optional[_Iterable[_Union[SliceReplicas, _Mapping]]] = ..., cluster_id: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("model", "tensors", "max_slice_bytes", "replace", "optimizer", "replicas", "owner", "tables")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    MAX_SLICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    model: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    max_slice_bytes: int
    replace: bool
    optimizer: _optimizer_pb2.OptimizerConfig
    replicas: int
    owner: str
    tables: _containers.RepeatedCompositeFieldContainer[_server_pb2.TableSpec]
    def __init__(self, model: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., max_slice_bytes: _Optional[int] = ..., replace: _Optional[bool] = ..., optimizer: _Optional[_Union[_optimizer_pb2.OptimizerConfig, _Mapping]] = ..., replicas: _Optional[int] = ..., owner: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[_server_pb2.TableSpec, _Mapping]]] = ...) -> None: ...

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

class ReplicaSet(_message.Message):
    __slots__ = ("servers",)
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, servers: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("model", "servers", "tensors", "slices", "optimizer", "max_slice_bytes", "replicas", "version", "replication", "owner", "tables")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MAX_SLICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    model: str
    servers: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    slices: _containers.RepeatedCompositeFieldContainer[SliceAssignment]
    optimizer: _optimizer_pb2.OptimizerConfig
    max_slice_bytes: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaSet]
    version: int
    replication: int
    owner: str
    tables: _containers.RepeatedCompositeFieldContainer[_server_pb2.TableSpec]
    def __init__(self, model: _Optional[str] = ..., servers: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., slices: _Optional[_Iterable[_Union[SliceAssignment, _Mapping]]] = ..., optimizer: _Optional[_Union[_optimizer_pb2.OptimizerConfig, _Mapping]] = ..., max_slice_bytes: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaSet, _Mapping]]] = ..., version: _Optional[int] = ..., replication: _Optional[int] = ..., owner: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[_server_pb2.TableSpec, _Mapping]]] = ...) -> None: ...

class ReportReplicaLostRequest(_message.Message):
    __slots__ = ("model", "primary", "backup", "error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    primary: str
    backup: str
    error: str
    def __init__(self, model: _Optional[str] = ..., primary: _Optional[str] = ..., backup: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ReportReplicaLostResponse(_message.Message):
    __slots__ = ("map_version",)
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    def __init__(self, map_version: _Optional[int] = ...) -> None: ...

class DrainServerRequest(_message.Message):
    __slots__ = ("address", "timeout_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    timeout_s: float
    def __init__(self, address: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class DrainServerResponse(_message.Message):
    __slots__ = ("shards_moved", "models")
    SHARDS_MOVED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    shards_moved: int
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shards_moved: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

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

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec_json", "request_id", "resume_from")
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    request_id: str
    resume_from: str
    def __init__(self, spec_json: _Optional[str] = ..., request_id: _Optional[str] = ..., resume_from: _Optional[str] = ...) -> None: ...

class CheckpointJobRequest(_message.Message):
    __slots__ = ("job_id", "url")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    url: str
    def __init__(self, job_id: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class CheckpointJobResponse(_message.Message):
    __slots__ = ("url", "bytes", "epoch")
    URL_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    url: str
    bytes: int
    epoch: int
    def __init__(self, url: _Optional[str] = ..., bytes: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class JobMetrics(_message.Message):
    __slots__ = ("epoch", "steps", "train_loss", "test_loss", "test_accuracy", "samples_per_s", "seconds", "samples", "duplicates", "staleness_updates", "staleness_clocks")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    STALENESS_UPDATES_FIELD_NUMBER: _ClassVar[int]
    STALENESS_CLOCKS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    steps: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    samples_per_s: float
    seconds: float
    samples: int
    duplicates: int
    staleness_updates: _containers.RepeatedScalarFieldContainer[int]
    staleness_clocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, epoch: _Optional[int] = ..., steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., test_loss: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., samples_per_s: _Optional[float] = ..., seconds: _Optional[float] = ..., samples: _Optional[int] = ..., duplicates: _Optional[int] = ..., staleness_updates: _Optional[_Iterable[int]] = ..., staleness_clocks: _Optional[_Iterable[int]] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "name", "state", "error", "spec_json", "metrics", "submitted_at", "tasks_done", "tasks_total", "prep_json", "owner")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TASKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREP_JSON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    state: str
    error: str
    spec_json: str
    metrics: JobMetrics
    submitted_at: float
    tasks_done: int
    tasks_total: int
    prep_json: str
    owner: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., spec_json: _Optional[str] = ..., metrics: _Optional[_Union[JobMetrics, _Mapping]] = ..., submitted_at: _Optional[float] = ..., tasks_done: _Optional[int] = ..., tasks_total: _Optional[int] = ..., prep_json: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("deleted", "params_freed")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FREED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    params_freed: bool
    def __init__(self, deleted: _Optional[bool] = ..., params_freed: _Optional[bool] = ...) -> None: ...

class FetchWeightsRequest(_message.Message):
    __slots__ = ("model", "max_chunk_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    max_chunk_bytes: int
    def __init__(self, model: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after: int
    def __init__(self, job_id: _Optional[str] = ..., after: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("seq", "time", "kind", "state", "message", "metrics", "tasks_done", "tasks_total")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TASKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: float
    kind: str
    state: str
    message: str
    metrics: JobMetrics
    tasks_done: int
    tasks_total: int
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., message: _Optional[str] = ..., metrics: _Optional[_Union[JobMetrics, _Mapping]] = ..., tasks_done: _Optional[int] = ..., tasks_total: _Optional[int] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("name", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "heartbeat_interval_s", "cluster_id", "incarnation")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_interval_s: float
    cluster_id: str
    incarnation: int
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., cluster_id: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class WorkerHeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "cluster_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    cluster_id: str
    def __init__(self, worker_id: _Optional[str] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class WorkerHeartbeatResponse(_message.Message):
    __slots__ = ("known", "cancelled_tasks")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_TASKS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    cancelled_tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, known: _Optional[bool] = ..., cancelled_tasks: _Optional[_Iterable[str]] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class LeaseTaskRequest(_message.Message):
    __slots__ = ("worker_id", "wait_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    wait_s: float
    def __init__(self, worker_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "lease_id", "job_id", "kind", "epoch", "shard", "shards", "spec_json", "prep_json", "lease_timeout_s", "clock_step")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    PREP_JSON_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CLOCK_STEP_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    job_id: str
    kind: str
    epoch: int
    shard: int
    shards: int
    spec_json: str
    prep_json: str
    lease_timeout_s: float
    clock_step: int
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., job_id: _Optional[str] = ..., kind: _Optional[str] = ..., epoch: _Optional[int] = ..., shard: _Optional[int] = ..., shards: _Optional[int] = ..., spec_json: _Optional[str] = ..., prep_json: _Optional[str] = ..., lease_timeout_s: _Optional[float] = ..., clock_step: _Optional[int] = ...) -> None: ...

class LeaseTaskResponse(_message.Message):
    __slots__ = ("task", "retry_after_s")
    TASK_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    task: Task
    retry_after_s: float
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class CompleteTaskRequest(_message.Message):
    __slots__ = ("worker_id", "task_id", "lease_id", "error", "samples", "steps", "loss_sum", "correct", "seconds", "duplicates", "result_json", "staleness", "clock_staleness")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_STALENESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    task_id: str
    lease_id: str
    error: str
    samples: int
    steps: int
    loss_sum: float
    correct: int
    seconds: float
    duplicates: int
    result_json: str
    staleness: _containers.RepeatedScalarFieldContainer[int]
    clock_staleness: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, worker_id: _Optional[str] = ..., task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., error: _Optional[str] = ..., samples: _Optional[int] = ..., steps: _Optional[int] = ..., loss_sum: _Optional[float] = ..., correct: _Optional[int] = ..., seconds: _Optional[float] = ..., duplicates: _Optional[int] = ..., result_json: _Optional[str] = ..., staleness: _Optional[_Iterable[int]] = ..., clock_staleness: _Optional[_Iterable[int]] = ...) -> None: ...

class ClockRequest(_message.Message):
    __slots__ = ("worker_id", "task_id", "lease_id", "steps", "applied", "wait_s", "closed_step")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    CLOSED_STEP_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    task_id: str
    lease_id: str
    steps: int
    applied: bool
    wait_s: float
    closed_step: int
    def __init__(self, worker_id: _Optional[str] = ..., task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., steps: _Optional[int] = ..., applied: _Optional[bool] = ..., wait_s: _Optional[float] = ..., closed_step: _Optional[int] = ...) -> None: ...

class ClockResponse(_message.Message):
    __slots__ = ("proceed", "lead", "step", "contributors", "members", "waiting_for", "staleness", "fast")
    PROCEED_FIELD_NUMBER: _ClassVar[int]
    LEAD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    FAST_FIELD_NUMBER: _ClassVar[int]
    proceed: bool
    lead: bool
    step: int
    contributors: int
    members: int
    waiting_for: str
    staleness: int
    fast: bool
    def __init__(self, proceed: _Optional[bool] = ..., lead: _Optional[bool] = ..., step: _Optional[int] = ..., contributors: _Optional[int] = ..., members: _Optional[int] = ..., waiting_for: _Optional[str] = ..., staleness: _Optional[int] = ..., fast: _Optional[bool] = ...) -> None: ...

class CompleteTaskResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...
