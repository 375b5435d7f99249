"""Loss and accuracy curves as TensorBoard event files (via tensorboardX), and a reader for tests."""

from __future__ import annotations

import math
import struct

import numpy as np
from pathlib import Path


class EventWriter:
    """Scalars of one job under ``logdir/run``."""

    def __init__(self, logdir: str, run: str):
        from tensorboardX import SummaryWriter
        self.path = Path(logdir) / run
        self._w = SummaryWriter(str(self.path))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            if v is not None and math.isfinite(v):
                self._w.add_scalar(tag, v, step)
        self._w.flush()

    def staleness(self, step: int, histograms: dict[str, list[int]]) -> None:
        """Staleness histograms (counts by value, ps.histogram): each as a TensorBoard histogram and
        its mean and max as scalars (``tag/mean``, ``tag/max``)."""
        from ps.histogram import summary
        for tag, counts in histograms.items():
            counts = list(counts)
            if not sum(counts):
                continue
            mean, top = summary(counts)
            values = [i for i, n in enumerate(counts) for _ in range(min(n, 10_000))]
            self._w.add_histogram(tag, np.asarray(values, np.float64), step, bins=np.arange(len(counts) + 1) - 0.5)
            self._w.add_scalar(f"{tag}/mean", mean, step)
            self._w.add_scalar(f"{tag}/max", top, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files in ``run_dir`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            record = data[pos + 12: pos + 12 + length]
            pos += 12 + length + 4
            ev = event_pb2.Event.FromString(record)
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out
