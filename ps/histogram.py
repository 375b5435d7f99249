"""Histograms as lists of counts by small non-negative integer value (staleness, in updates or clocks):
plain data that travels in protobuf ``repeated int64`` fields and JSON alike."""

from __future__ import annotations

#: a histogram has at most this many buckets; the last one counts everything at or above its value
BUCKETS = 33


def bump(histogram: list[int], value: int, n: int = 1) -> None:
    """Count ``n`` observations of ``value`` (negative values count as 0)."""
    i = min(max(int(value), 0), BUCKETS - 1)
    if len(histogram) <= i:
        histogram.extend([0] * (i + 1 - len(histogram)))
    histogram[i] += n


def merge(into: list[int], other) -> None:
    """Add the counts of ``other`` into ``into``."""
    for value, n in enumerate(other):
        if n:
            bump(into, value, int(n))


def summary(histogram) -> tuple[float, int]:
    """(mean, max) of the values counted; (nan, 0) for none."""
    total = sum(histogram)
    if not total:
        return float("nan"), 0
    top = max(i for i, n in enumerate(histogram) if n)
    return sum(i * n for i, n in enumerate(histogram)) / total, top
