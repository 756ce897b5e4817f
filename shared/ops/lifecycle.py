"""One shutdown helper for both daemons: SIGTERM and SIGINT set an event and run the stop callbacks.

A Python signal handler runs in the main thread between two of its bytecodes, which may at that moment hold
any lock, the stop event's own among them (inside ``Event.wait``): a handler that took a lock could wait for
itself for ever. So the handler takes none: it notes the signal and writes a byte to a pipe; a watcher thread,
started on entry, sets the event and runs the stop callbacks. A daemon whose main thread blocks in a call that
no event can wake (a gRPC long poll) passes ``interrupt``: that exception is raised in the main thread to
unwind it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Shutdown:
    """``with Shutdown() as stop:`` ... ``stop.event`` is set on SIGTERM/SIGINT; handlers restored on exit.

    Only the main thread installs handlers (elsewhere the block does nothing)."""

    def __init__(self, *, interrupt: type[BaseException] | None = None) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._interrupt = interrupt
        self._callbacks: list[Callable[[], None]] = []
        self._previous: dict[int, object] = {}
        self._wake: int | None = None  # the pipe's write end: the handler's only action besides noting the signal

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (on the watcher thread, once) when the first signal arrives."""
        self._callbacks.append(callback)

    @property
    def requested(self) -> bool:
        """A signal arrived (true from the handler on, before the watcher has set the event)."""
        return self.signum is not None or self.event.is_set()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        if self._wake is not None:
            try:
                os.write(self._wake, b"\0")
            except OSError:  # the pipe is full (a burst of signals): the watcher has bytes to read already
                pass
        if self._interrupt is not None:
            raise self._interrupt()

    def _watch(self, readable: int) -> None:
        """The watcher: on the first byte, set the event and run the callbacks; end when the pipe closes."""
        try:
            ran = False
            while os.read(readable, 64):
                self.event.set()
                if not ran:
                    ran = True
                    for callback in self._callbacks:
                        callback()
        finally:
            os.close(readable)

    def __enter__(self) -> Shutdown:
        if threading.current_thread() is threading.main_thread():
            readable, self._wake = os.pipe()
            os.set_blocking(self._wake, False)
            threading.Thread(target=self._watch, args=(readable,), name="shutdown", daemon=True).start()
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if self._wake is not None:  # the watcher reads what is left, then the end of the pipe, and ends
            wake, self._wake = self._wake, None
            os.close(wake)
