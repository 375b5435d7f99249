"""What a worker does with a job spec before training: read its data (``load_data``), build its
model (``build_model``), and check one against the other (``prepare``); ``inspect`` is the
job's first task, whose result the scheduler needs to start the job: the preprocessing
statistics and every parameter's initializer spec (shapes and seeds, never values).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from ps.errors import PSError
from ps.spec import JobSpec, SpecError

#: a part of the held-out split evaluated by a task of its own has at least this many examples
EVAL_PART_MIN = 4096


def load_data(spec: JobSpec):
    """The job's dataset (cached per process), reshaped as the spec says."""
    from ps.worker.data import load_cached, read_dataset
    d = spec.data
    key = json.dumps(dataclasses.asdict(d), sort_keys=True)

    def load():
        ds = read_dataset(d.uri, d.format, label=d.label, text=d.text)
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
    except PSError as e:  # refused by the data policy: its message names the field and the rule
        raise SpecError(str(e)) from None
    except (ValueError, OSError) as e:
        raise SpecError(f"spec.data: {e}") from None
    n = len(ds.x)
    if n < 2:
        raise SpecError(f"spec.data: '{spec.data.uri}' has {n} example(s); need at least 2")
    input_shape = tuple(int(s) for s in ds.x.shape[1:])
    model = build_model(spec, input_shape)
    ids = np.issubdtype(ds.x.dtype, np.integer)
    if model.reads_ids and not ids:
        raise SpecError(f"spec.model: layer 0 ({model.layers[0].type}) reads ids, but '{spec.data.uri}' holds "
                        f"{ds.x.dtype} features (text data and synthetic:ctr hold ids)")
    if ids and not model.reads_ids:
        raise SpecError(f"spec.model: '{spec.data.uri}' holds ids (int64): the first layer must read them "
                        f"(embedding or sparse_linear), not {model.layers[0].type}")
    if model.reads_ids and spec.consistency == "bsp":
        raise SpecError("spec.consistency: bsp does not cover sparse tables yet (their rows are pushed as "
                        "they are computed): use asp or ssp")
    if model.reads_ids and spec.replicas > 1:
        raise SpecError(f"spec.replicas: sparse tables are held once for now (a server's death loses its rows): "
                        f"expected 0 or 1, got {spec.replicas}")
    if model.reads_ids and (spec.checkpoint_every_epochs or spec.checkpoint_every_s):
        raise SpecError("spec.checkpoint_every_epochs/checkpoint_every_s: checkpoints do not hold sparse tables "
                        "yet, and one without them would not resume this job")
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
    # ids are not features: never scaled
    scaler = Scaler("none" if ids else spec.data.scale).fit(ds.x[train_idx].reshape(len(train_idx), -1))
    # asp: 2 tasks per worker balance uneven workers; ssp/bsp: one fixed shard per worker (its clock member)
    shards = spec.data.shards or (2 * spec.workers if spec.consistency == "asp" else spec.workers)
    shards = max(1, min(shards, math.ceil(len(train_idx) / spec.batch_size)))
    # the held-out split in parts evaluated side by side, one per worker wanted, none under EVAL_PART_MIN examples
    eval_shards = max(1, min(spec.workers, len(test_idx) // EVAL_PART_MIN))
    tables = {name: t.spec(name).to_dict() for name, t in model.tables(spec.seed, np.dtype(spec.dtype)).items()}
    return {"input_shape": list(input_shape), "n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
            "shards": int(shards), "eval_shards": int(eval_shards), "scaler": scaler.to_dict(), "output_shape": list(out), "tables": tables,
            "majority_baseline": _majority(y[test_idx]) if spec.loss != "mse" else None}


def _majority(y: np.ndarray) -> float:
    """The test accuracy of always answering the most frequent class of ``y``."""
    _, counts = np.unique(y, return_counts=True)
    return float(counts.max() / len(y)) if len(y) else 0.0


def inspect(spec: JobSpec) -> dict:
    """The inspect task's result: {"prep": prepare(spec), "params": {name: Init fields}}."""
    prep = prepare(spec)
    model = build_model(spec, tuple(prep["input_shape"]))
    params = {name: dataclasses.asdict(init)
              for name, init in model.initializers(spec.seed, np.dtype(spec.dtype)).items()}
    for fields in params.values():
        fields.pop("extra", None)
        fields["shape"] = list(fields["shape"])
    return {"prep": prep, "params": params}
