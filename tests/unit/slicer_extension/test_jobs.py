"""RadBridgeLib.jobs.BackgroundAnalysis: a worker thread reporting typed events, without Slicer."""

from __future__ import annotations

import threading
import time

import pytest
from RadBridgeLib.client import RadBridgeCancelled, RadBridgeServerError
from RadBridgeLib.jobs import TERMINAL_EVENTS, BackgroundAnalysis, Cancelled, Done, Failed, Progress


def _drain(job: BackgroundAnalysis, timeout: float = 5.0) -> list:
    assert job.wait(timeout), "the worker did not finish"
    return job.poll()


def test_progress_in_order_then_done_and_start_returns_at_once() -> None:
    release = threading.Event()

    def work(on_progress, cancel_event):
        on_progress(0.1, "receiving")
        assert release.wait(5)
        on_progress(0.5, "running")
        on_progress(1.0, "done")
        return "the result"

    job = BackgroundAnalysis(work)
    assert not job.running
    job.start()
    assert job.running  # start() returned while the work is blocked
    deadline = time.monotonic() + 5
    first: list = []
    while not first and time.monotonic() < deadline:
        first = job.poll()
        time.sleep(0.005)
    assert first == [Progress(0.1, "receiving")]
    assert job.poll() == []  # non-blocking, nothing new
    release.set()
    events = _drain(job)
    assert events == [Progress(0.5, "running"), Progress(1.0, "done"), Done("the result")]
    assert not job.running
    assert job.poll() == []


def test_cancel_sets_the_event_and_a_cancelled_event_ends_the_stream() -> None:
    seen = threading.Event()

    def work(on_progress, cancel_event):
        on_progress(0.05, "uploading")
        seen.set()
        while not cancel_event.wait(0.01):
            pass
        raise RadBridgeCancelled("The analysis was cancelled.")

    job = BackgroundAnalysis(work).start()
    assert seen.wait(5)
    assert not job.cancel_requested
    job.cancel()
    assert job.cancel_requested
    events = _drain(job)
    assert events == [Progress(0.05, "uploading"), Cancelled()]


def test_server_error_becomes_failed_with_its_message() -> None:
    def work(on_progress, cancel_event):
        raise RadBridgeServerError("Cannot reach the RadBridge inference service at x:1 (UNAVAILABLE: down).")

    events = _drain(BackgroundAnalysis(work).start())
    assert events == [Failed("Cannot reach the RadBridge inference service at x:1 (UNAVAILABLE: down).")]


def test_unexpected_exception_becomes_failed_not_a_dead_thread() -> None:
    def work(on_progress, cancel_event):
        raise ValueError("voxels must be 3-D")

    events = _drain(BackgroundAnalysis(work).start())
    assert events == [Failed("ValueError: voxels must be 3-D")]


def test_exactly_one_terminal_event_and_start_twice_refused() -> None:
    job = BackgroundAnalysis(lambda on_progress, cancel_event: 42).start()
    events = _drain(job)
    assert [e for e in events if isinstance(e, TERMINAL_EVENTS)] == [Done(42)]
    with pytest.raises(RuntimeError):
        job.start()


def test_cancel_after_done_changes_nothing() -> None:
    job = BackgroundAnalysis(lambda on_progress, cancel_event: "r").start()
    assert job.wait(5)
    job.cancel()
    assert job.poll() == [Done("r")]
