"""One analysis in a background thread, reported to the GUI thread as typed events.

The Slicer widget must never block: it starts a :class:`BackgroundAnalysis` and polls it from a
``qt.QTimer`` on the main thread. The worker thread only pushes events into a ``queue.Queue``;
it never touches the GUI or MRML. Pure Python: no slicer, qt or vtk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .client import RadBridgeCancelled, RadBridgeError


@dataclass(frozen=True)
class Progress:
    """Overall progress 0..1 (never decreasing) and a short message."""

    fraction: float
    message: str


@dataclass(frozen=True)
class Done:
    """The analysis finished; ``result`` is what the callable returned (an AnalysisResult)."""

    result: Any


@dataclass(frozen=True)
class Failed:
    """The analysis failed; ``message`` is meant for the user."""

    message: str


@dataclass(frozen=True)
class Cancelled:
    """The analysis was cancelled by the user."""


AnalysisEvent = Progress | Done | Failed | Cancelled
#: The events that end an analysis; exactly one of them is the last event.
TERMINAL_EVENTS = (Done, Failed, Cancelled)
#: work(on_progress, cancel_event) -> result; typically a closure over RadBridgeClient.analyze.
Work = Callable[[Callable[[float, str], None], threading.Event], Any]


class BackgroundAnalysis:
    """Runs ``work(on_progress, cancel_event)`` in a daemon thread.

    Exactly one terminal event (Done, Failed or Cancelled) ends the event stream; Progress events
    come before it, in the order the worker reported them.
    """

    def __init__(self, work: Work, name: str = "radbridge-analysis") -> None:
        self._work = work
        self._events: queue.Queue[AnalysisEvent] = queue.Queue()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def start(self) -> BackgroundAnalysis:
        if self._started:
            raise RuntimeError("This analysis was already started.")
        self._started = True
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True from start() until the worker has pushed its terminal event."""
        return self._started and not self._finished.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Asks the worker to stop; a Cancelled event follows once it has (unless it already finished)."""
        self._cancel.set()

    def poll(self) -> list[AnalysisEvent]:
        """Every event pushed since the last poll, without blocking."""
        out: list[AnalysisEvent] = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the worker has finished (for tests and scripts, never the GUI thread)."""
        return self._finished.wait(timeout)

    def _progress(self, fraction: float, message: str) -> None:
        self._events.put(Progress(float(fraction), str(message)))

    def _run(self) -> None:
        try:
            result = self._work(self._progress, self._cancel)
        except RadBridgeCancelled:
            self._events.put(Cancelled())
        except RadBridgeError as exc:
            self._events.put(Failed(str(getattr(exc, "message", None) or exc)))
        except Exception as exc:  # the worker must never die silently: the user sees the reason
            if self._cancel.is_set():
                self._events.put(Cancelled())
            else:
                self._events.put(Failed(f"{type(exc).__name__}: {exc}"))
        else:
            if self._cancel.is_set() and result is None:
                self._events.put(Cancelled())
            else:
                self._events.put(Done(result))
        finally:
            self._finished.set()
