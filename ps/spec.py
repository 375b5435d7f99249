"""JobSpec: what to train, on what data, how. Plain data (dataclasses), loadable from JSON or
TOML, so a job travels to any stateless worker as text; nothing is unpickled.

Only schema checks live here: this module reads no data and builds no model, so the scheduler
and the client can check a spec without importing worker code. Checking a spec against its
data (``ps.worker.inspect``) is the job's first task, run on a worker.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSSES = ("softmax_cross_entropy", "binary_cross_entropy", "mse")
SCALERS = ("standard", "minmax", "none")
CONSISTENCY = ("asp", "ssp", "bsp")
DTYPES = ("float32", "float64")
MAX_STALENESS = 1000


def accumulator(job_id: str) -> str:
    """The model a "bsp" job's workers sum each step's gradients into (beside the job's own, ``job_id``)."""
    return f"{job_id}.acc"


#: an accumulator's optimizer: SGD with lr 1 adds the negated gradients pushed to it
ACCUMULATOR_OPTIMIZER = {"name": "sgd", "lr": 1.0}
#: the longest an ApplyAccumulated call with members may wait for its step to close, in seconds
MAX_STEP_WAIT_S = 30.0


class SpecError(ValueError):
    """A job spec that cannot run; the message names the field."""


def _check_fields(cls, d: dict, where: str) -> None:
    """Unknown keys are an error that names the first of them and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")


#: spec.data.text: each key's default (ps.worker.text reads text with these)
TEXT_DEFAULTS: dict[str, Any] = {"column": None, "ngrams": 1, "hash_bits": 20, "max_tokens": 256}
#: the whole numbers each spec.data.text key may take, both ends included
TEXT_RANGES = {"ngrams": (1, 5), "hash_bits": (1, 30), "max_tokens": (1, 1 << 16)}


def text_options(value: dict | None, where: str = "spec.data.text") -> dict[str, Any]:
    """``value`` (a spec's data.text) checked and completed with TEXT_DEFAULTS; raises SpecError
    naming the key, e.g. ``spec.data.text.hash_bits: expected an integer in [1, 30], got 40``."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected an object with keys {', '.join(TEXT_DEFAULTS)}, got {value!r}")
    unknown = sorted(set(value) - set(TEXT_DEFAULTS))
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(TEXT_DEFAULTS)})")
    out = {**TEXT_DEFAULTS, **value}
    column = out["column"]
    if column is not None and (isinstance(column, bool) or not isinstance(column, (str, int))):
        raise SpecError(f"{where}.column: expected a column name or index, got {column!r}")
    for key, (lo, hi) in TEXT_RANGES.items():
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise SpecError(f"{where}.{key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return out


@dataclass
class DataSpec:
    """Where the examples come from and how they are prepared."""

    uri: str = "builtin:digits"
    format: str | None = None          # inferred from the URI when None
    label: str | int | None = None     # CSV/parquet label column (name or index); IDX labels file URI
    reshape: list[int] | None = None   # per-example shape, e.g. [1, 8, 8] for a CNN on digits
    test_fraction: float = 0.3
    scale: str = "standard"            # standard | minmax | none, fitted on the training split
    one_hot: bool = False              # one-hot labels (for an MSE loss on classes)
    shards: int = 0                    # training-split parts per epoch (tasks); 0: 2 per wanted worker
    # text data (hashed token ids, ps.worker.text): column, ngrams, hash_bits, max_tokens; see TEXT_DEFAULTS
    text: dict | None = None


@dataclass
class JobSpec:
    """A training job."""

    model: list[dict] = field(default_factory=lambda: [{"type": "dense", "units": 64, "activation": "relu"},
                                                       {"type": "dense", "units": 10}])
    data: DataSpec = field(default_factory=DataSpec)
    loss: str = "softmax_cross_entropy"
    optimizer: dict = field(default_factory=lambda: {"name": "adam", "lr": 0.001})
    batch_size: int = 32
    epochs: int = 10
    workers: int = 2
    seed: int = 0
    name: str = "job"
    consistency: str = "asp"  # asp (no waiting) | ssp (at most `staleness` clocks ahead of the slowest) | bsp
    staleness: int = 3        # ssp's bound s, in clocks (training steps); 0 steps in lockstep
    dtype: str = "float32"    # the parameters' dtype: float32 | float64
    lease_timeout_s: float = 30.0
    metrics: list[str] = field(default_factory=lambda: ["loss", "accuracy"])
    keep_params: bool = False  # keep the parameters on the servers after success (else freed after retention)
    replicas: int = 0          # servers holding each slice of the parameters; 0: 2 when >= 2 servers are up
    checkpoint_every_s: float = 0.0  # write a checkpoint this often (0: not by time)
    checkpoint_every_epochs: int = 0  # ... or every this many epochs (0: not by epochs)
    checkpoint_dir: str = ""   # where (any fsspec URL); "": the scheduler's --checkpoint-dir
    eval_every: int = 1        # evaluate on the held-out split after every this many epochs, and after the last

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobSpec":
        if not isinstance(d, dict):
            raise SpecError(f"spec: expected an object, got {type(d).__name__}")
        _check_fields(cls, d, "spec")
        d = dict(d)
        if "data" in d:
            data = d["data"]
            if isinstance(data, str):
                data = {"uri": data}
            if not isinstance(data, dict):
                raise SpecError(f"spec.data: expected an object or a URI string, got {type(data).__name__}")
            _check_fields(DataSpec, data, "spec.data")
            d["data"] = DataSpec(**data)
        spec = cls(**d)
        spec.check()
        return spec

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"spec: not valid JSON: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "JobSpec":
        """From a .json or .toml file."""
        p = Path(path)
        if not p.exists():
            raise SpecError(f"spec file '{p}' does not exist")
        if p.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            try:
                return cls.from_dict(tomllib.loads(p.read_text()))
            except tomllib.TOMLDecodeError as e:
                raise SpecError(f"spec file '{p}': not valid TOML: {e}") from None
        return cls.from_json(p.read_text())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def check(self) -> None:
        """Checks that need no data; sizes against this process's limits (ps.limits.current())."""
        from ps.errors import PSError
        from ps.limits import current
        lim = current()

        def positive(name, value, kind=int, limit=None):
            if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"spec.{name}: expected a positive {kind.__name__}, got {value!r}")
            if limit is not None and value > getattr(lim, limit):
                raise SpecError(f"spec.{name}: {value} exceeds the limit {getattr(lim, limit)} {lim.hint(limit)}")

        def kind_of(name, value, kinds, expected):
            kinds = kinds if isinstance(kinds, tuple) else (kinds,)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise SpecError(f"spec.{name}: expected {expected}, got {value!r}")
        positive("batch_size", self.batch_size, limit="max_batch_size")
        positive("epochs", self.epochs, limit="max_epochs")
        positive("workers", self.workers, limit="max_shards")
        kind_of("name", self.name, str, "a string")
        try:
            lim.check_name("spec.name", self.name)
        except PSError as e:
            raise SpecError(str(e)) from None
        kind_of("seed", self.seed, int, "an integer in [0, 2**63)")
        if not 0 <= self.seed < 1 << 63:
            raise SpecError(f"spec.seed: expected an integer in [0, 2**63), got {self.seed}")
        kind_of("keep_params", self.keep_params, bool, "true or false")
        kind_of("replicas", self.replicas, int, "an integer >= 0")
        kind_of("checkpoint_every_s", self.checkpoint_every_s, (int, float), "a number of seconds >= 0")
        if not math.isfinite(self.checkpoint_every_s) or self.checkpoint_every_s < 0:
            raise SpecError(f"spec.checkpoint_every_s: expected a number of seconds >= 0, got {self.checkpoint_every_s!r}")
        kind_of("checkpoint_every_epochs", self.checkpoint_every_epochs, int, "an integer >= 0")
        if self.checkpoint_every_epochs < 0:
            raise SpecError(f"spec.checkpoint_every_epochs: expected an integer >= 0, got {self.checkpoint_every_epochs!r}")
        kind_of("eval_every", self.eval_every, int, "an integer >= 1")
        if self.eval_every < 1:
            raise SpecError(f"spec.eval_every: expected an integer >= 1 (epochs between evaluations), "
                            f"got {self.eval_every!r}")
        kind_of("checkpoint_dir", self.checkpoint_dir, str, "a directory or fsspec URL")
        if len(self.checkpoint_dir) > 4096:
            raise SpecError("spec.checkpoint_dir: longer than 4096 characters")
        if isinstance(self.replicas, bool) or not 0 <= self.replicas <= 16:
            raise SpecError(f"spec.replicas: expected an integer in [0, 16] (0: the scheduler's default), "
                            f"got {self.replicas!r}")
        kind_of("lease_timeout_s", self.lease_timeout_s, (int, float), "a positive number")
        if not math.isfinite(self.lease_timeout_s) or self.lease_timeout_s <= 0:
            raise SpecError(f"spec.lease_timeout_s: expected a positive number, got {self.lease_timeout_s!r}")
        kind_of("loss", self.loss, str, "a string")
        kind_of("consistency", self.consistency, str, "a string")
        kind_of("optimizer", self.optimizer, dict, "an object")
        kind_of("metrics", self.metrics, list, "a list")
        d = self.data
        kind_of("data.uri", d.uri, str, "a string")
        kind_of("data.format", d.format, (str, type(None)), "a string")
        kind_of("data.label", d.label, (str, int, type(None)), "a column name or index")
        kind_of("data.reshape", d.reshape, (list, type(None)), "a list of positive ints")
        kind_of("data.scale", d.scale, str, "a string")
        kind_of("data.one_hot", d.one_hot, bool, "true or false")
        kind_of("data.test_fraction", d.test_fraction, (int, float), "a number in (0, 1)")
        kind_of("data.shards", d.shards, int, "an integer >= 0")
        if not 0 <= d.shards <= lim.max_shards:
            raise SpecError(f"spec.data.shards: expected an integer >= 0 (0: 2 per worker), at most the limit "
                            f"{lim.max_shards} {lim.hint('max_shards')}, got {d.shards}")
        if d.reshape is not None and (len(d.reshape) > lim.max_dims or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= lim.max_synthetic_values
                for v in d.reshape)):
            raise SpecError(f"spec.data.reshape: expected at most {lim.max_dims} positive ints "
                            f"{lim.hint('max_dims')}, got {d.reshape!r}")
        if d.text is not None:
            text_options(d.text, "spec.data.text")
        if d.uri.startswith("synthetic:"):
            try:
                lim.check_synthetic_uri("spec.data.uri", d.uri)
            except PSError as e:
                raise SpecError(str(e)) from None
        if self.loss not in LOSSES:
            raise SpecError(f"spec.loss: unknown loss '{self.loss}': expected one of {', '.join(LOSSES)}")
        if self.consistency not in CONSISTENCY:
            raise SpecError(f"spec.consistency: '{self.consistency}' is not supported (supported: "
                            f"{', '.join(CONSISTENCY)})")
        kind_of("staleness", self.staleness, int, f"an integer in [0, {MAX_STALENESS}]")
        if not 0 <= self.staleness <= MAX_STALENESS:
            raise SpecError(f"spec.staleness: expected an integer in [0, {MAX_STALENESS}], got {self.staleness}")
        if self.consistency != "asp" and d.shards not in (0, self.workers):
            raise SpecError(f"spec.data.shards: a {self.consistency} job gives each of its {self.workers} workers "
                            f"one fixed shard per epoch: expected 0 or {self.workers}, got {d.shards}")
        kind_of("dtype", self.dtype, str, "a string")
        if self.dtype not in DTYPES:
            raise SpecError(f"spec.dtype: expected one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if not isinstance(self.model, list) or not self.model:
            raise SpecError("spec.model: expected a non-empty list of layers")
        if self.data.scale not in SCALERS:
            raise SpecError(f"spec.data.scale: unknown scaling '{self.data.scale}': expected one of "
                            f"{', '.join(SCALERS)}")
        if not 0 < self.data.test_fraction < 1:
            raise SpecError(f"spec.data.test_fraction: expected a number in (0, 1), got {self.data.test_fraction}")
        try:
            from ps.optimizer_config import OptimizerConfig
            OptimizerConfig.from_dict(dict(self.optimizer))
        except (ValueError, TypeError) as e:
            raise SpecError(f"spec.optimizer: {e}") from None
