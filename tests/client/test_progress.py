"""Progress display: rate, ETA and line formats with fixed inputs, and what gets written on a TTY and off one."""

from __future__ import annotations

import io

import pytest

from batch_gateway.client.progress import (
    ProgressDisplay,
    RateEstimator,
    Snapshot,
    format_counts,
    format_duration,
    format_progress,
    format_rate,
    format_status_change,
    progress_bar,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "?"),
        (0, "0s"),
        (0.4, "0s"),
        (42, "42s"),
        (59.6, "1m00s"),
        (185, "3m05s"),
        (3600, "1h00m"),
        (3720, "1h02m"),
        (-5, "0s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (None, "? req/s"),
        (123.4, "123 req/s"),
        (12.34, "12 req/s"),
        (3.21, "3.2 req/s"),
        (0.254, "0.25 req/s"),
        (0.0, "0.00 req/s"),
    ],
)
def test_format_rate(rate, text):
    assert format_rate(rate) == text


def test_rate_and_eta_over_a_sliding_window():
    rate = RateEstimator(window=10)
    assert rate.rate() is None and rate.eta(100) is None
    rate.add(0.0, 0)
    assert rate.rate() is None
    rate.add(2.0, 20)
    assert rate.rate() == pytest.approx(10.0)
    assert rate.eta(80) == pytest.approx(8.0)
    assert rate.eta(0) == 0.0
    # The batch slows down: after the window has passed, only the recent pace counts.
    for t in range(3, 30):
        rate.add(float(t), 20 + (t - 2))
    assert rate.rate() == pytest.approx(1.0)
    assert rate.eta(10) == pytest.approx(10.0)


def test_rate_is_unknown_without_progress_or_time():
    rate = RateEstimator()
    rate.add(5.0, 10)
    rate.add(5.0, 12)
    assert rate.rate() is None
    rate.add(6.0, 12)
    assert rate.rate() == pytest.approx(2.0)


def test_rate_restarts_when_counts_go_backwards():
    rate = RateEstimator()
    rate.add(0.0, 50)
    rate.add(1.0, 60)
    rate.add(2.0, 5)
    assert rate.rate() is None


def test_progress_bar_and_counts():
    assert progress_bar(0, 10, 10) == "[----------]"
    assert progress_bar(3, 10, 10) == "[###-------]"
    assert progress_bar(10, 10, 10) == "[##########]"
    assert progress_bar(5, 0, 4) == "[----]"
    assert format_counts(Snapshot("validating", 0, 0, 0)) == "0/?"
    assert format_counts(Snapshot("in_progress", 400, 117, 3)) == "120/400 (30%), 3 failed"


def test_progress_line_shows_rate_and_eta_only_while_running():
    running = Snapshot("in_progress", 400, 117, 3)
    assert format_progress(running, 12.34, 23) == "in_progress  120/400 (30%), 3 failed  12 req/s  ETA 23s"
    assert format_progress(running, None, None, bar_width=10) == (
        "in_progress  [###-------]  120/400 (30%), 3 failed  ? req/s  ETA ?"
    )
    assert format_progress(Snapshot("finalizing", 400, 400, 0), 5.0, 0) == "finalizing   400/400 (100%)"


def test_status_change_lines():
    assert format_status_change(None, "validating", 0) == "status: validating"
    assert format_status_change("validating", "in_progress", 2.2) == "status: validating -> in_progress (after 2s)"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_output_prints_status_changes_and_periodic_lines():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(out, is_tty=False, plain_every=10, clock=clock)
    display.update(Snapshot("validating", 0, 0, 0))
    clock.now = 1
    display.update(Snapshot("in_progress", 100, 0, 0))
    clock.now = 5
    display.update(Snapshot("in_progress", 100, 40, 0))  # too soon for another line
    clock.now = 12
    display.update(Snapshot("in_progress", 100, 80, 2))
    clock.now = 30
    display.update(Snapshot("in_progress", 100, 80, 2))  # nothing changed: no line
    clock.now = 31
    display.update(Snapshot("completed", 100, 98, 2))
    assert out.getvalue().splitlines() == [
        "status: validating",
        "status: validating -> in_progress (after 1s)",
        "in_progress  0/100 (0%)  0.00 req/s  ETA ?",
        "in_progress  82/100 (82%), 2 failed  6.8 req/s  ETA 3s",  # 82 done in 12 s
        "status: in_progress -> completed (after 30s)",
    ]
    assert "\r" not in out.getvalue()


def test_tty_output_redraws_one_line_and_keeps_status_changes():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(out, is_tty=True, clock=clock)
    display.update(Snapshot("in_progress", 10, 0, 0))
    clock.now = 1
    display.update(Snapshot("in_progress", 10, 5, 0))
    display.clear()
    text = out.getvalue()
    assert text.startswith("status: in_progress\n")
    assert text.count("\r\x1b[2K") >= 3  # each redraw clears the line first
    assert "5/10 (50%)" in text and "5.0 req/s" in text and "ETA 1s" in text
    assert "[" in text and "#" in text
