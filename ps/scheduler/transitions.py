"""Why the scheduler's state changed: every transition recorded with its reason."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Transition:
    at: float
    subject: str  # a server, worker, job or task id
    change: str   # e.g. "up -> down"
    reason: str


class TransitionLog(deque):
    """The most recent transitions, oldest first."""

    def __init__(self, maxlen: int = 5000):
        super().__init__(maxlen=maxlen)

    def record(self, at: float, subject: str, change: str, reason: str) -> None:
        self.append(Transition(at, subject, change, reason))
