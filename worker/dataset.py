"""The Dataset type every reader returns (its own module, so the readers in ``data`` and the
built-in and synthetic sets in ``datasets`` share it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Dataset:
    """Examples as numpy arrays: ``x`` float32 (N, ...), ``y`` int64 class ids or float32 targets."""

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str] | None = None
    classes: list[str] | None = None   # label names when the label column held text; y indexes them
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # CSR (data, indices, indptr), LIBSVM only

    def __len__(self) -> int:
        return len(self.x)
