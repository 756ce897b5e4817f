"""One shutdown helper for both daemons: SIGTERM and SIGINT set an event and run the stop callbacks.

Signal handlers may not take locks, so the callbacks run on a helper thread. A daemon whose main
thread blocks in a call that no event can wake (a gRPC long poll) passes ``interrupt``: that
exception is raised in the main thread to unwind it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Shutdown:
    """``with Shutdown() as stop:`` ... ``stop.event`` is set on SIGTERM/SIGINT; handlers restored on exit."""

    def __init__(self, *, interrupt: type[BaseException] | None = None) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._interrupt = interrupt
        self._callbacks: list[Callable[[], None]] = []
        self._previous: dict[int, object] = {}

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (on a helper thread) when a signal arrives."""
        self._callbacks.append(callback)

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum if first else self.signum
        self.event.set()
        if first and self._callbacks:
            threading.Thread(target=self._run_callbacks, name="shutdown", daemon=True).start()
        if self._interrupt is not None:
            raise self._interrupt()

    def _run_callbacks(self) -> None:
        for callback in self._callbacks:
            callback()

    def __enter__(self) -> Shutdown:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
