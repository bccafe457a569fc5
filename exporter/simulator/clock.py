"""Clocks for the simulated driver.

Every simulated value is a pure function of time, so the driver asks a clock instead of
calling `time.time()` itself: tests drive a `ManualClock`, the demo runs on a `WallClock`.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Anything that tells the simulated time in unix seconds."""

    def now(self) -> float: ...


class WallClock:
    """The real time (`time.time()`), for the demo and the benchmarks."""

    def now(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return "WallClock()"


class ManualClock:
    """A clock that only moves when a test moves it; safe to read from other threads."""

    def __init__(self, start: float) -> None:
        self._lock = threading.Lock()
        self._t = float(start)

    def now(self) -> float:
        with self._lock:
            return self._t

    def advance(self, seconds: float) -> None:
        """Move the clock forward; a negative step is refused because real time never does it."""
        if seconds < 0:
            raise ValueError(f"ManualClock.advance: seconds must be >= 0, got {seconds}")
        with self._lock:
            self._t += float(seconds)

    def set(self, t: float) -> None:
        """Jump to an absolute time (either direction; tests use it to revisit a moment)."""
        with self._lock:
            self._t = float(t)

    def __repr__(self) -> str:
        return f"ManualClock({self.now()!r})"
