"""Live progress of a batch while the CLI waits for it: rate, ETA, a bar on a terminal, plain lines otherwise.

The formatting functions are pure (numbers in, text out) so they can be tested with fixed inputs; `ProgressDisplay`
only decides *when* to write what they return.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from batch_gateway.wire import TERMINAL_STATUSES, BatchStatus


@dataclass(frozen=True)
class Snapshot:
    """What one poll of the batch told us."""

    status: str
    total: int
    completed: int
    failed: int

    @property
    def done(self) -> int:
        return self.completed + self.failed


class RateEstimator:
    """Requests finished per second over a sliding window, so the rate follows the batch's current speed
    (a batch slows down when its upstream is busy) instead of averaging over its whole life."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, done: int) -> None:
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # counts went backwards (a resumed batch): start over
        self._samples.append((at, done))
        # Keep one sample older than the window so the rate always spans the whole window.
        while len(self._samples) > 2 and self._samples[1][0] <= at - self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Finished requests per second, or None before there are two samples some time apart."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 - t0 <= 0:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self, remaining: int) -> float | None:
        """Seconds until `remaining` more requests finish at the current rate; None when unknown."""
        if remaining <= 0:
            return 0.0
        rate = self.rate()
        if not rate:
            return None
        return remaining / rate


def format_duration(seconds: float | None) -> str:
    """`42s`, `3m05s`, `1h02m`; `?` when unknown."""
    if seconds is None:
        return "?"
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_rate(rate: float | None) -> str:
    """`12.3 req/s`, `0.25 req/s`, `? req/s`; small rates keep two decimals so a slow batch does not show 0.0."""
    if rate is None:
        return "? req/s"
    if rate >= 10:
        return f"{rate:.0f} req/s"
    if rate >= 1:
        return f"{rate:.1f} req/s"
    return f"{rate:.2f} req/s"


def progress_bar(done: int, total: int, width: int) -> str:
    """`[#####-----]` with `width` cells between the brackets."""
    fraction = min(1.0, done / total) if total > 0 else 0.0
    filled = int(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def format_counts(snap: Snapshot) -> str:
    """`120/400 (30%), 3 failed`; the total is `?` until the server has counted the input."""
    text = f"{snap.done}/{snap.total} ({100 * snap.done // snap.total}%)" if snap.total > 0 else f"{snap.done}/?"
    if snap.failed:
        text += f", {snap.failed} failed"
    return text


def format_progress(snap: Snapshot, rate: float | None, eta: float | None, *, bar_width: int = 0) -> str:
    """One progress line: status, optional bar, counts and, while requests are running, rate and ETA."""
    parts = [f"{snap.status:<11}"]
    if bar_width > 0:
        parts.append(progress_bar(snap.done, snap.total, bar_width))
    parts.append(format_counts(snap))
    if snap.status == BatchStatus.IN_PROGRESS:
        parts.append(format_rate(rate))
        parts.append(f"ETA {format_duration(eta)}")
    return "  ".join(parts)


def format_status_change(old: str | None, new: str, elapsed: float) -> str:
    if old is None:
        return f"status: {new}"
    return f"status: {old} -> {new} (after {format_duration(elapsed)})"


class ProgressDisplay:
    """Writes progress to a stream (stderr): a redrawn bar on a terminal, periodic plain lines otherwise.

    Status changes are always printed on their own line, so the history of a batch stays readable in a log.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        is_tty: bool | None = None,
        plain_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = self.stream.isatty() if is_tty is None else is_tty
        self.plain_every = plain_every
        self.clock = clock
        self.rate = RateEstimator()
        self._started = clock()
        self._status: str | None = None
        self._status_since = self._started
        self._last_plain: float | None = None
        self._last_plain_done = -1
        self._bar_drawn = False

    def update(self, snap: Snapshot) -> None:
        now = self.clock()
        self.rate.add(now, snap.done)
        changed = snap.status != self._status
        if changed:
            self.line(format_status_change(self._status, snap.status, now - self._status_since))
            self._status, self._status_since = snap.status, now
        eta = self.rate.eta(snap.total - snap.done) if snap.total > 0 else None
        if self.is_tty:
            width = shutil.get_terminal_size((100, 20)).columns
            text = format_progress(snap, self.rate.rate(), eta, bar_width=max(10, min(40, width - 70)))
            self.stream.write("\r\x1b[2K" + text[: width - 1])
            self.stream.flush()
            self._bar_drawn = True
        elif self._plain_due(now, snap, changed):
            self.line(format_progress(snap, self.rate.rate(), eta))
            self._last_plain, self._last_plain_done = now, snap.done

    def _plain_due(self, now: float, snap: Snapshot, status_changed: bool) -> bool:
        """A plain line when the status changes and then every `plain_every` seconds while counts move; none
        before the server has counted the requests, nor for a terminal status (the summary follows)."""
        if snap.total <= 0 or snap.status in TERMINAL_STATUSES:
            return False
        if status_changed or self._last_plain is None:
            return True
        return now - self._last_plain >= self.plain_every and snap.done != self._last_plain_done

    def line(self, text: str) -> None:
        """Print a whole line, first clearing the bar so the two never mix."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self._bar_drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._bar_drawn = False

    @property
    def elapsed(self) -> float:
        return self.clock() - self._started
