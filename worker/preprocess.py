"""Preprocessing and sharding of examples: the train/test split, feature scaling fitted on the
training split only, one-hot labels, the contiguous shards that tasks name, and shuffled
mini-batches. All pure functions of their arguments and a seed, so every worker computes the
same split, shards and batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ps.worker.data import validate_labels

SCALER_KINDS = ("standard", "minmax", "none")


def _rng(*words: int) -> np.random.Generator:
    # SeedSequence takes non-negative words only; wrap negative or huge seeds onto 64 bits.
    return np.random.default_rng(np.random.SeedSequence([int(w) % 2**64 for w in words]))


def train_test_split(n: int, test_fraction: float = 0.3, seed: int = 0,
                     stratify: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded random split of ``range(n)``: (train_idx, test_idx), disjoint and
    covering every row. Both come in shuffled order, so contiguous shards of the training split
    mix the classes even when the file is sorted by label. ``stratify``: labels whose class
    proportions both parts keep."""
    n = int(n)
    if n < 0:
        raise ValueError(f"train_test_split: n must be >= 0, got {n}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"train_test_split: test_fraction must be in (0, 1), got {test_fraction}")
    rng = _rng(seed)
    if stratify is None:
        perm = rng.permutation(n)
        n_test = _n_test(n, test_fraction)
        return perm[n_test:].astype(np.int64), perm[:n_test].astype(np.int64)
    labels = np.asarray(stratify)
    if len(labels) != n:
        raise ValueError(f"train_test_split: stratify has {len(labels)} labels for n={n}")
    train, test = [], []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        k = int(round(len(rows) * test_fraction))
        test.append(rows[:k])
        train.append(rows[k:])
    train_idx = rng.permutation(np.concatenate(train)).astype(np.int64)
    test_idx = rng.permutation(np.concatenate(test)).astype(np.int64)
    return train_idx, test_idx


def _n_test(n: int, test_fraction: float) -> int:
    k = int(round(n * test_fraction))
    if n >= 2:  # both parts non-empty whenever that is possible
        k = min(max(k, 1), n - 1)
    return k


class Scaler:
    """Feature scaling: ``standard`` (zero mean, unit variance), ``minmax`` (to [0, 1]) or ``none``.
    ``fit`` on the training split only; ``to_dict``/``from_dict`` carry the statistics as plain
    JSON lists so they are saved with a model."""

    def __init__(self, kind: str = "standard"):
        if kind not in SCALER_KINDS:
            raise ValueError(f"unknown scaling '{kind}': expected one of {', '.join(SCALER_KINDS)}")
        self.kind = kind
        self.shift: np.ndarray | None = None   # subtracted: mean or min
        self.scale: np.ndarray | None = None   # divided by: std or range, never 0

    def fit(self, x: np.ndarray) -> Scaler:
        """Compute the statistics over axis 0 of ``x``; returns self."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "none":
            return self
        if len(x) == 0:
            raise ValueError("Scaler.fit: no examples")
        if self.kind == "standard":
            shift, spread = x.mean(axis=0), x.std(axis=0)
        else:
            shift = x.min(axis=0)
            spread = x.max(axis=0) - shift
        # A constant feature would divide by ~0 (or by round-off noise): leave its spread at 1.
        tiny = 1e-7 * np.maximum(np.abs(shift), 1.0)
        self.shift = shift
        self.scale = np.where(spread > tiny, spread, 1.0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Scaled float32 copy of ``x``."""
        x = np.asarray(x, dtype=np.float32)
        if self.kind == "none":
            return x.copy()
        if self.shift is None:
            raise ValueError(f"Scaler('{self.kind}').transform called before fit")
        if x.shape[1:] != self.shift.shape:
            raise ValueError(f"Scaler.transform: expected examples of shape {self.shift.shape}, got {x.shape[1:]}")
        return ((x - self.shift.astype(np.float32)) / self.scale.astype(np.float32)).astype(np.float32)

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)

    def to_dict(self) -> dict:
        """The statistics as plain JSON-able data."""
        d: dict = {"kind": self.kind}
        if self.kind != "none" and self.shift is not None:
            names = ("mean", "std") if self.kind == "standard" else ("min", "range")
            d[names[0]] = self.shift.tolist()
            d[names[1]] = self.scale.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scaler:
        """Inverse of ``to_dict``."""
        s = cls(d.get("kind", "none"))
        if s.kind != "none":
            names = ("mean", "std") if s.kind == "standard" else ("min", "range")
            missing = [k for k in names if k not in d]
            if missing:
                raise ValueError(f"scaler '{s.kind}': missing '{missing[0]}' statistics")
            s.shift = np.asarray(d[names[0]], dtype=np.float64)
            s.scale = np.asarray(d[names[1]], dtype=np.float64)
            if s.shift.shape != s.scale.shape:
                raise ValueError(f"scaler '{s.kind}': '{names[0]}' and '{names[1]}' differ in shape")
            if np.any(s.scale == 0):
                raise ValueError(f"scaler '{s.kind}': '{names[1]}' holds a zero")
        return s


def one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Class ids (N,) -> float32 (N, n_classes) indicator rows."""
    y = np.asarray(y)
    validate_labels(y, n_classes)
    out = np.zeros((len(y), n_classes), dtype=np.float32)
    out[np.arange(len(y)), y.astype(np.int64)] = 1.0
    return out


def shard_ranges(n_examples: int, n_shards: int) -> list[tuple[int, int]]:
    """``n_shards`` contiguous ``(start, stop)`` ranges covering ``[0, n_examples)`` exactly; sizes
    differ by at most one (the first ``n_examples % n_shards`` get the extra row)."""
    if n_shards < 1:
        raise ValueError(f"shard_ranges: n_shards must be >= 1, got {n_shards}")
    if n_examples < 0:
        raise ValueError(f"shard_ranges: n_examples must be >= 0, got {n_examples}")
    base, extra = divmod(int(n_examples), int(n_shards))
    out, start = [], 0
    for i in range(int(n_shards)):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> Iterator[np.ndarray]:
    """Index arrays over ``range(n)`` in a shuffled order fixed by ``(seed, epoch)``; the last batch
    is smaller unless ``drop_last``."""
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    order = _rng(seed, epoch).permutation(int(n)).astype(np.int64)
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
