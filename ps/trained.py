"""A trained model: weights plus the spec and preprocessing statistics that produced them.

Saved as a directory with ``model.safetensors`` (the weights) and ``model.json`` (the job
spec, input shape and scaler statistics); ``load_model(path).predict(X)`` runs it locally
with NumPy on raw inputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WEIGHTS, META = "model.safetensors", "model.json"


def scale(prep: dict, x: np.ndarray) -> np.ndarray:
    """Apply the job's scaler (fitted on the flattened training split) to raw examples; ids (integer
    examples, for a model whose first layer reads them) pass unchanged."""
    from ps.worker.preprocess import Scaler
    if np.issubdtype(np.asarray(x).dtype, np.integer):
        return np.asarray(x, np.int64)
    flat = np.asarray(x, np.float32).reshape(len(x), -1)
    return np.asarray(Scaler.from_dict(prep["scaler"]).transform(flat), np.float32).reshape(x.shape)


@dataclass
class TrainedModel:
    spec: dict
    prep: dict
    weights: dict[str, np.ndarray]
    metrics: dict = field(default_factory=dict)
    job_id: str = ""

    def _net(self):
        from ps.spec import JobSpec
        from ps.worker.inspect import build_model
        return build_model(JobSpec.from_dict(self.spec), tuple(self.prep["input_shape"]))

    def _prepare(self, x) -> np.ndarray:
        """Raw inputs -> the scaled, shaped batch the network takes."""
        x = np.asarray(x, dtype=np.float32)
        shape = tuple(self.prep["input_shape"])
        if x.ndim < 2 or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise ValueError(f"predict: expected inputs of shape (N, {', '.join(map(str, shape))}), got {x.shape}")
        return scale(self.prep, x).reshape((len(x), *shape))

    def forward(self, x) -> np.ndarray:
        """Model outputs (logits) for raw inputs."""
        return np.asarray(self._net().forward(np, self.weights, self._prepare(x), train=False))

    def predict(self, x) -> np.ndarray:
        """Class ids (softmax cross-entropy), 0/1 (binary cross-entropy) or values (MSE) for raw inputs."""
        return np.asarray(self._net().predict(np, self.weights, self._prepare(x), loss=self.spec["loss"]))

    def predict_proba(self, x) -> np.ndarray:
        """Probabilities for raw inputs: per class, shape (N, classes), for softmax cross-entropy;
        of class 1, shape (N,), for binary cross-entropy. An MSE model has none (ValueError)."""
        logits = self.forward(x).astype(np.float64)
        loss = self.spec["loss"]
        if loss == "softmax_cross_entropy":
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        if loss == "binary_cross_entropy":
            return 1.0 / (1.0 + np.exp(-logits.reshape(len(logits))))
        raise ValueError(f"predict_proba: a model trained with loss '{loss}' predicts values, not probabilities")

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.weights.items()}, str(p / WEIGHTS))
        meta = {"format": "paramserver-model/1", "job_id": self.job_id, "spec": self.spec, "prep": self.prep,
                "metrics": self.metrics}
        (p / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
        return p


def load_model(path: str | os.PathLike) -> TrainedModel:
    """A model saved by ``Job.save`` / ``TrainedModel.save``."""
    from safetensors.numpy import load_file
    p = Path(path)
    if not (p / META).exists() or not (p / WEIGHTS).exists():
        raise FileNotFoundError(f"'{p}' is not a saved paramserver model: expected {META} and {WEIGHTS} in it")
    meta = json.loads((p / META).read_text())
    return TrainedModel(meta["spec"], meta["prep"], load_file(str(p / WEIGHTS)), meta.get("metrics", {}),
                        meta.get("job_id", ""))
