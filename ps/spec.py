"""JobSpec: what to train, on what data, how. Plain data (dataclasses), loadable from JSON or
TOML, so a job travels to any stateless worker as text; nothing is unpickled.

``prepare(spec)`` validates a spec against its data (submit time) and returns the
preprocessing statistics, computed on the training split only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LOSSES = ("softmax_cross_entropy", "binary_cross_entropy", "mse")
SCALERS = ("standard", "minmax", "none")
CONSISTENCY = ("asp",)


class SpecError(ValueError):
    """A job spec that cannot run; the message names the field."""


def _check_fields(cls, d: dict, where: str) -> None:
    """Unknown keys are an error that names the first of them and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")


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
    consistency: str = "asp"
    lease_timeout_s: float = 30.0
    metrics: list[str] = field(default_factory=lambda: ["loss", "accuracy"])

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
        """Checks that need no data."""
        def positive(name, value, kind=int):
            if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"spec.{name}: expected a positive {kind.__name__}, got {value!r}")
        positive("batch_size", self.batch_size)
        positive("epochs", self.epochs)
        positive("workers", self.workers)
        if not isinstance(self.lease_timeout_s, (int, float)) or self.lease_timeout_s <= 0:
            raise SpecError(f"spec.lease_timeout_s: expected a positive number, got {self.lease_timeout_s!r}")
        if self.loss not in LOSSES:
            raise SpecError(f"spec.loss: unknown loss '{self.loss}': expected one of {', '.join(LOSSES)}")
        if self.consistency not in CONSISTENCY:
            raise SpecError(f"spec.consistency: '{self.consistency}' is not supported (supported: asp)")
        if not isinstance(self.model, list) or not self.model:
            raise SpecError("spec.model: expected a non-empty list of layers")
        if self.data.scale not in SCALERS:
            raise SpecError(f"spec.data.scale: unknown scaling '{self.data.scale}': expected one of "
                            f"{', '.join(SCALERS)}")
        if not 0 < self.data.test_fraction < 1:
            raise SpecError(f"spec.data.test_fraction: expected a number in (0, 1), got {self.data.test_fraction}")
        try:
            from ps.server.optimizers import OptimizerConfig
            OptimizerConfig.from_dict(dict(self.optimizer))
        except (ValueError, TypeError) as e:
            raise SpecError(f"spec.optimizer: {e}") from None


def load_data(spec: JobSpec):
    """The job's dataset (cached per process), reshaped as the spec says."""
    from ps.worker.data import load_cached, read_dataset
    d = spec.data
    key = json.dumps(dataclasses.asdict(d), sort_keys=True)

    def load():
        ds = read_dataset(d.uri, d.format, label=d.label)
        if d.reshape:
            want = int(np.prod(d.reshape))
            if int(np.prod(ds.x.shape[1:])) != want:
                raise SpecError(f"spec.data.reshape: {d.reshape} holds {want} values, but each example has "
                                f"{int(np.prod(ds.x.shape[1:]))}")
            ds.x = ds.x.reshape((len(ds.x), *d.reshape))
        return ds
    return load_cached(key, load)


def build_model(spec: JobSpec, input_shape: tuple[int, ...]):
    from ps.worker.model import Sequential
    try:
        return Sequential.from_spec(spec.model, input_shape=tuple(input_shape))
    except ValueError as e:
        raise SpecError(f"spec.model: {e}") from None


def prepare(spec: JobSpec) -> dict:
    """Validate the spec against its data and compute what every worker shares: the input shape,
    the split sizes and the scaler statistics (training split only). Raises SpecError."""
    from ps.worker.preprocess import Scaler, train_test_split
    try:
        ds = load_data(spec)
    except FileNotFoundError as e:
        raise SpecError(f"spec.data.uri: {e}") from None
    except SpecError:
        raise
    except (ValueError, OSError) as e:
        raise SpecError(f"spec.data: {e}") from None
    n = len(ds.x)
    if n < 2:
        raise SpecError(f"spec.data: '{spec.data.uri}' has {n} example(s); need at least 2")
    input_shape = tuple(int(s) for s in ds.x.shape[1:])
    model = build_model(spec, input_shape)
    out = tuple(model.output_shape)
    units = int(np.prod(out))
    y = ds.y
    if spec.loss == "softmax_cross_entropy" or (spec.loss == "mse" and spec.data.one_hot):
        n_classes = units
        bad = np.flatnonzero((y < 0) | (y >= n_classes) | (y != np.floor(y)))
        if bad.size:
            raise SpecError(f"spec.data: label {y[bad[0]]:g} at row {bad[0]} is outside [0, {n_classes}) "
                            f"(the model has {n_classes} outputs)")
    elif spec.loss == "binary_cross_entropy":
        if units != 1:
            raise SpecError(f"spec.loss: binary_cross_entropy needs 1 output, the model has {units}")
        bad = np.flatnonzero((y != 0) & (y != 1))
        if bad.size:
            raise SpecError(f"spec.data: label {y[bad[0]]:g} at row {bad[0]} is not 0 or 1 "
                            f"(binary_cross_entropy)")
    elif spec.loss == "mse" and y.ndim == 1 and units != 1:
        raise SpecError(f"spec.loss: mse on scalar targets needs 1 output, the model has {units}")
    train_idx, test_idx = train_test_split(n, spec.data.test_fraction, spec.seed)
    scaler = Scaler(spec.data.scale).fit(ds.x[train_idx].reshape(len(train_idx), -1))
    shards = spec.data.shards or 2 * spec.workers
    shards = max(1, min(shards, math.ceil(len(train_idx) / spec.batch_size)))
    return {"input_shape": list(input_shape), "n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
            "shards": int(shards), "scaler": scaler.to_dict(), "output_shape": list(out)}
